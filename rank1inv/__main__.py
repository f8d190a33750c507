"""``python -m rank1inv [demo]``: the main job. ``python -m rank1inv --help`` lists every entry
point, those of a checkout included."""

import sys

from .examples import demo

COMMANDS = {
    "demo": "accuracy and speed against the paper, then OBS pruning of a digits MLP (the main job, ~40 s)",
}
CHECKOUT = {  # entry points that live beside the package, in a clone of the repository
    "python -m benchmarks [--help]": "the benchmarks of docs/benchmarks.md",
    "python -m benchmarks experiments [name]": "the experiments of docs/experiments.md (PyTorch)",
    "python -m tools.gpu_check --out DIR": "the GPU tests and benchmarks in one short run, with a report",
    "python -m tools.api_docs": "regenerate docs/api.md from the public names' docstrings (seconds)",
    "bash .ci/run": "pip-install the pinned test dependencies (torch, jax, dask, mpi4py, ruff, mypy, ...) into "
    "the active Python, then lint, type-check and run the tests (what CI runs; ~5 min on 2 quiet cores)",
}


def usage() -> str:
    lines = ["usage: python -m rank1inv [command] [options]   (command: demo by default)", ""]
    lines += [f"  {name:10s} {text}" for name, text in COMMANDS.items()]
    lines += ["", "from a checkout of the repository:"]
    lines += [f"  {name:42s} {text}" for name, text in CHECKOUT.items()]
    lines += ["", "each command takes --help"]
    return "\n".join(lines)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    command = argv.pop(0) if argv else "demo"
    if command == "demo":
        run = demo.main
    else:
        print(usage(), file=sys.stderr)
        return 2
    return run(argv) or 0


if __name__ == "__main__":
    sys.exit(main())
