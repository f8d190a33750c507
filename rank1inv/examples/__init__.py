"""The main job (``python -m rank1inv demo``) and what it runs: the digits MLP and its pruning
experiment, on data shipped with the package (``examples/data``), and the timing helper."""
