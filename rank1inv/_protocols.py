"""The internal contracts: what an operator asks of a group of blocks, a group of its factor, the
passes of a gradient view, and the backend of its compiled kernels (docs/design.md §2).

An operator (``rank1inv._operator``) is a block layout whose runs of equal blocks are each
served by a *group* (``rank1inv.groups``); a group in gradient space holds a *factor* of its m×m
system K' = G'G'ᵀ + M'. As in lineax, the operator (what is inverted) and the solver (how) are
separate: a group answers queries about F⁻¹ for its blocks; a factor only solves and whitens.
Groups read the gradients only through ``rank1inv._passes``, which takes an array (nb, m, B) or a
*gradient view* of that shape (layer factors, column chunks, this rank's shard): each pass is one
method of the view. Compiled kernels are reached through ``_backend.kernels(xp)``, one object
per backend with every member of ``Kernels`` (None where that backend has no such kernel).

Frames (``rank1inv._scaling``): a group computes with G' = DG (one power of two per gradient)
and returns values that the operator multiplies by 2^exponent. Right-hand sides arrive
normalized (max|x| per block and column in [0.5, 1)); ``inverse_exponent`` and
``fisher_exponent`` are added to their exponents. ``tests/test_protocols.py`` checks that every
implementation has every member with the declared parameters.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable, Optional, Protocol, Union, runtime_checkable

Array = Any  # an array-API array (NumPy or CuPy; Dask chunks inside views)
HostArray = Any  # a NumPy array on the host


@runtime_checkable
class Factor(Protocol):
    """A factorisation of a batch of SPD m×m matrices K (nb, m, m), float64."""

    def solve(self, P: Array, b0: int = 0, b1: int | None = None) -> Array:
        """K⁻¹P for P (b1-b0, m, k) float64, blocks b0:b1. O(m²k) per block."""

    def whiten(self, P: Array, b0: int = 0, b1: int | None = None) -> Array:
        """L⁻¹P for some K = LLᵀ, P (b1-b0, m, k). O(m²k) per block."""

    def logdets(self) -> HostArray:
        """log det K per block: a host float64 array (nb,)."""

    def condition(self) -> float:
        """An estimate of cond(K) over the blocks (the products' refinement test)."""


@runtime_checkable
class Group(Protocol):
    """``count`` equal diagonal blocks of ``size`` coordinates, queried as one batch.

    Products take X (count, size, k) float64 (normalized) and return (count, size, k) float64 in
    the group's frame; diagonals return (count·size,), entries (n,) and cross blocks (n, n'),
    all to be multiplied by 2^``inverse_exponent`` (F⁻¹) or 2^``fisher_exponent`` (F, an int or
    one per block (count, 1, 1)). ``row_max`` (max|g_i| per block and row, host) and
    ``exact_products`` (the storage's float64 products are exact) are set by ``make_group``
    and let ``redamp_group`` choose new frames; ``scale`` is s."""

    count: int
    size: int
    scale: float
    inverse_exponent: int
    fisher_exponent: Any
    row_max: Any
    exact_products: bool

    @property
    def noise_width(self) -> int:
        """Standard normals per block beyond one per coordinate (``sample``)."""

    def apply(self, X: Array) -> Array:
        """F⁻¹X per block (X may be overwritten with the result). O(m·size·k) per block
        (Woodbury) or O(size²k) (dense)."""

    def apply_fisher(self, X: Array) -> Array:
        """F X per block."""

    def diag(self) -> Array:
        """diag F⁻¹ over the group's coordinates."""

    def pairs(self, r: Array, c: Array) -> Array:
        """F⁻¹[r_t, c_t] for local offsets r, c (same block)."""

    def cross(self, r: Array, c: Array) -> Array:
        """Dense F⁻¹[r][:, c] for local offsets (zero across blocks)."""

    def fisher_diag(self) -> Array:
        """diag F over the group's coordinates."""

    def logdets(self) -> HostArray:
        """log det F_b per block: a host float64 array (count,)."""

    def sample(self, Z1: Array, Z2: Array) -> tuple[Array, Any]:
        """(values, exponent) of draws with covariance F_b⁻¹ from standard normals Z1
        (count, size, k) and Z2 (count, noise_width, k); Z1 may be overwritten."""

    def apply_power(self, X: Array, p: float) -> tuple[Array, Any]:
        """(values, exponent) of F_b^p X per block."""

    def gram_spectrum(self) -> HostArray:
        """s·eig(GGᵀ) per block (the eigenvalues of s·G_bᵀG_b that can be nonzero): a host
        float64 array (count, r), descending."""

    def redamped(self, damp: float, frame, blocks=(0, None), row_max: HostArray | None = None) -> Group:
        """Blocks b0:b1 with damping ``damp`` in frame ``frame`` (``row_max``: those blocks'),
        G not read again."""


@runtime_checkable
class GradientSpaceGroup(Group, Protocol):
    """A group in gradient space (Woodbury): what the window, the sharded and the chunked
    operators ask beyond ``Group``."""

    Gg: GroupGradients  # the gradients it reads, (count, m, size): an array or a GradientView

    def apply_to_gradients(
        self, E: Array, X: Array, P: Array, x_exponent: int, row_frame: int = 0
    ) -> tuple[Array, int]:
        """(Y, exponent) of F⁻¹Gᵀe for stored gradients (push_apply), without cancellation."""

    def restricted(self, Gg: GroupGradients) -> GradientSpaceGroup:
        """This group on some of its columns (one chunk), sharing the m×m state."""

    def whitened(self, r: Array) -> Array:
        """w_r = L⁻¹g'_r for local offsets r: (len r, m)."""

    def columns(self, r: Array, common: bool = False) -> Array:
        """Columns r of G' (in the common frame with ``common``): (len r, m)."""

    def bounded(self, value: Array, col_sq: Array, blocks=None) -> Array:
        """λ·F⁻¹_jj from 1 − ‖w_j‖², clamped below by its bound λ/F_jj (an AccuracyWarning when
        digits were lost)."""

    @property
    def damp_fraction(self) -> float:
        """λ_f with λ = λ_f·2^λ_e: the entries' scale in the frame."""


class GradientView(ABC):
    """Gradients a pass cannot index as one array: a group of shape (nb, m, B) read through
    methods (``rank1inv._passes`` calls the method of the same name; its docstrings give each
    pass's contract). Implemented by ``_passes.TiledView`` (layer factors), ``_chunks.ColumnChunks``
    (Dask chunks, host streaming) and ``sharded.ShardedView`` (this rank's columns)."""

    shape: tuple
    dtype: Any
    ndim = 3
    communicator: Optional[Any] = None  # the Communicator of a view across ranks
    materialized = False  # whether caching an m×B float64 whitening of it is reasonable

    @property
    @abstractmethod
    def device(self) -> Any:
        """Where the view's results live."""

    @property
    def global_width(self) -> int:
        """B over all ranks."""
        return self.shape[2]

    @abstractmethod
    def gram(self, accumulate: str, scale=1.0, weights=None) -> Array:
        """(σG·W)(σG·W)ᵀ per block: (nb, m, m) float64."""

    @abstractmethod
    def column_gram(self, accumulate: str, scale=1.0) -> Array:
        """(σG)ᵀ(σG) per block: (nb, B, B) float64."""

    @abstractmethod
    def project(self, X: Array, accumulate: str, scale=1.0) -> Array:
        """(σG)X per block: (nb, m, k) float64."""

    @abstractmethod
    def project_sumsq(self, X: Array, accumulate: str, scale=1.0, weights=None) -> tuple[Array, Array]:
        """(project(X·W), Σ_i X²) in one reduction."""

    @abstractmethod
    def project_gram(self, X: Array, accumulate: str, scale=1.0) -> tuple[Array, Array]:
        """(project(X), XᵀX) in one reduction (a window's new Gram rows)."""

    @abstractmethod
    def combine(self, X: Array, C: Array, alpha: float, beta: float, accumulate: str, scale=1.0, out=None) -> Array:
        """αX + β(σG)ᵀC per block: (nb, B, k) float64 (into ``out`` if given; it may be X)."""

    @abstractmethod
    def column_sumsq(self, scale=1.0, weights=None) -> Array:
        """Σ_i (σG_ij·w_j)² per column: (nb, B) float64."""

    @abstractmethod
    def map_tiles(self, fn: Callable, scale=1.0, weights=None) -> Array:
        """fn(b0, b1, tile) over float64 tiles of σG·W, assembled along the columns."""

    @abstractmethod
    def columns(self, blocks: Array, offsets: Array) -> Array:
        """Columns g_j (no frame) of ``blocks`` at local ``offsets``: (n, m) float64."""

    @abstractmethod
    def row_max_abs(self, weights=None) -> HostArray:
        """max_j |G_ij·w_j| per block and row: host float64 (nb, m)."""

    @abstractmethod
    def max_abs(self) -> float:
        """max |G| as a host float (nan/inf if not finite)."""


class GradientSource(ABC):
    """Gradients (m, d) that are not an array: they give a ``GradientView`` of any run of equal
    blocks (``rank1inv.FactoredGradients``, ``rank1inv.StreamedGradients``)."""

    shape: tuple

    @abstractmethod
    def view(self, start: int, count: int, size: int) -> GradientView:
        """The blocks G[:, start + b·size : start + (b+1)·size], b < count, as a view."""


@runtime_checkable
class Kernels(Protocol):
    """The compiled passes and level-2 loops of one backend (``rank1inv.cpu``,
    ``rank1inv.cuda.kernels``); members a backend lacks are None."""

    def usable(self, Gg: Array, k: int) -> bool:
        """Whether ``project``/``combine`` serve the group Gg with k right-hand sides."""

    def project(self, Gg: Array, X: Array) -> Array:
        """Gg·X per block, float64 accumulation: (nb, m, k)."""

    def combine(self, Gg: Array, X: Array, C: Array, alpha: float, beta: float, out=None) -> Array:
        """α·X + β·GgᵀC per block: (nb, B, k)."""

    def chol_drop_usable(self, R: Array, n: int) -> bool:
        """Whether ``chol_drop`` serves the factor R."""

    def chol_drop(self, src: Array, dst: Array, n: int, k: int) -> None:
        """dst ← src without row and column k of its leading n×n factor."""

    @property
    def chol_drop_solve(self) -> Optional[Callable]:
        """chol_drop, and R̃⁻ᵀ·rhs for the new factor in the same sweep (CPU), or None."""

    @property
    def solve_upper(self) -> Optional[Callable]:
        """In-place triangular solves with the padded factor (CPU), or None."""

    @property
    def mfac_b(self) -> Optional[Callable]:
        """M-FAC's B by the blocked kernel (CUDA), or None."""


GroupGradients = Union[GradientView, Array]  # what a group reads: an array (nb, m, B) or a view
