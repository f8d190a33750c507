"""Benchmarks and experiments of rank1inv (from a checkout; not part of the installed package).

``python -m benchmarks [--help]`` runs the benchmarks of docs/benchmarks.md;
``python -m benchmarks experiments [name]`` the experiments of docs/experiments.md.
"""
