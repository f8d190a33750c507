"""``python -m rank1inv demo`` (the main job), ``bench`` (benchmarks), ``gpu-check`` (the checks
for a lent GPU). ``--help`` of each says more."""

import sys

COMMANDS = {
    "demo": "accuracy and speed against the paper, then OBS pruning of a digits MLP (the main job)",
    "bench": "the benchmarks of docs/benchmarks.md",
    "gpu-check": "the GPU tests and benchmarks in one short run, with a report (docs/benchmarks.md)",
}


def usage() -> str:
    lines = ["usage: python -m rank1inv [command] [options]   (command: demo by default)", ""]
    lines += [f"  {name:10s} {text}" for name, text in COMMANDS.items()]
    return "\n".join(lines)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv else "demo"
    if command in ("-h", "--help", "help"):
        print(usage())
        return 0
    if command == "demo":
        from .demo import main as run
    elif command == "bench":
        from .bench import main as run
    elif command == "gpu-check":
        from .gpu_check import main as run
    else:
        print(usage(), file=sys.stderr)
        return 2
    return run(argv) or 0


if __name__ == "__main__":
    sys.exit(main())
