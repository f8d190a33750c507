"""``python -m benchmarks [options]`` (the benchmarks) or ``python -m benchmarks experiments
[name]`` (the experiments); ``--help`` of each says more."""

import sys

from rank1inv.examples import progress


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    with progress.reporting():  # stage lines and bars on stderr; the tables on stdout
        if argv and argv[0] == "experiments":
            from .experiments import main as run

            return run(argv[1:]) or 0
        from .bench import main as run

        return run(argv) or 0


if __name__ == "__main__":
    sys.exit(main())
