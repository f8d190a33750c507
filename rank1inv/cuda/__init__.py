"""CUDA RawKernels (``*.cu``), their CuPy launchers (``kernels``) and NumPy mirrors (``mirrors``).

Importing this package never imports CuPy; ``kernels`` does, and is only loaded on CuPy data.
"""

from pathlib import Path

SOURCES = sorted(p.name for p in Path(__file__).parent.glob("*.cu"))
