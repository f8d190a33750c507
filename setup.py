"""Optional compiled CPU kernel; everything else is in pyproject.toml."""

import sys

from setuptools import Extension, setup

args = [] if sys.platform == "win32" else ["-O3", "-Wno-psabi"]

setup(
    ext_modules=[
        Extension(
            "rank1inv.cpu._kernels",
            sources=["rank1inv/cpu/passes.c", "rank1inv/cpu/window.c"],
            extra_compile_args=args,
            optional=True,
        )
    ]
)
