"""Thin adapters for PyTorch (``rank1inv.adapters.torch``) and JAX (``rank1inv.adapters.jax``).

Each is imported explicitly and needs its framework installed; the core never imports them.
"""
