"""Developer tools of rank1inv (from a checkout): ``python -m tools.gpu_check`` for a lent GPU."""
