"""``python -m rank1inv demo`` (the main job) and ``python -m rank1inv bench`` (benchmarks)."""

import sys


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv else "demo"
    if command == "demo":
        from .demo import main as run
    elif command == "bench":
        from .bench import main as run
    else:
        print("usage: python -m rank1inv [demo|bench] [options]   (see --help of each)", file=sys.stderr)
        return 2
    return run(argv) or 0


if __name__ == "__main__":
    sys.exit(main())
