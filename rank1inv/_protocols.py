"""The internal protocols: what an operator asks of a group of blocks, and a group of a factor.

An operator (``rank1inv._operator``) is a block layout whose runs of equal blocks are each
served by a *group*; a group in gradient space (``_woodbury.WoodburyGroup``) holds a *factor* of
its m×m system K' = G'G'ᵀ + μ'I. As in lineax, the operator (what is inverted) and the solver
(how) are separate: a group answers queries about F⁻¹ for its blocks; a factor only solves and
whitens. docs/design.md §2 has the picture.

Frames (``rank1inv._scaling``): a group computes with G' = σG, σ = 2^-E, and returns values
that the operator multiplies by 2^exponent. Right-hand sides arrive normalized (max|x| per block
and column in [0.5, 1)); ``inverse_exponent`` and ``fisher_exponent`` are added to their
exponents.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class Factor(Protocol):
    """A factorisation of a batch of SPD m×m matrices K (nb, m, m), float64."""

    def solve(self, P, b0: int = 0, b1: int | None = None):
        """K⁻¹P for P (b1-b0, m, k) float64, blocks b0:b1. O(m²k) per block."""

    def whiten(self, P, b0: int = 0, b1: int | None = None):
        """L⁻¹P for some K = LLᵀ, P (b1-b0, m, k). O(m²k) per block."""

    def logdet(self) -> float:
        """Σ over blocks of log det K."""

    def logdets(self):
        """log det K per block: a host float64 array (nb,)."""


@runtime_checkable
class Group(Protocol):
    """``count`` equal diagonal blocks of ``size`` coordinates, queried as one batch.

    Products take X (count, size, k) float64 (normalized) and return (count, size, k) float64 in
    the group's frame; diagonals return (count·size,), entries (n,) and cross blocks (n, n'),
    all to be multiplied by 2^``inverse_exponent`` (F⁻¹) or 2^``fisher_exponent`` (F)."""

    count: int
    size: int
    inverse_exponent: int
    fisher_exponent: int

    def apply(self, X):
        """F⁻¹X per block (X may be overwritten with the result). O(m·size·k) per block
        (Woodbury) or O(size²k) (dense)."""

    def apply_fisher(self, X):
        """F X per block."""

    def diag(self):
        """diag F⁻¹ over the group's coordinates."""

    def pairs(self, r, c):
        """F⁻¹[r_t, c_t] for local offsets r, c (same block)."""

    def cross(self, r, c):
        """Dense F⁻¹[r][:, c] for local offsets (zero across blocks)."""

    def fisher_diag(self):
        """diag F over the group's coordinates."""

    def logdet(self) -> float:
        """Σ over the group's blocks of log det F_b (not scaled by any exponent)."""

    def logdets(self):
        """log det F_b per block: a host float64 array (count,)."""

    noise_width: int  # standard normals per block beyond one per coordinate (``sample``)

    def sample(self, Z1, Z2):
        """(values, exponent) of draws with covariance F_b⁻¹ from standard normals Z1
        (count, size, k) and Z2 (count, noise_width, k); Z1 may be overwritten."""

    def apply_power(self, X, p: float):
        """(values, exponent) of F_b^p X per block."""

    def gram_spectrum(self):
        """s·eig(GGᵀ) per block (the eigenvalues of s·G_bᵀG_b that can be nonzero): a host
        float64 array (count, r), descending."""

    def redamped(self, damp: float, frame: int, blocks=(0, None)):
        """Blocks b0:b1 with damping ``damp`` in frame ``frame``, G not read again."""
