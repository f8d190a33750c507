"""laplace-torch's own API over rank1inv: the exact full-network Laplace at sizes where a d×d
posterior precision cannot be formed (docs/design.md §10).

``Rank1invLaplace`` is a ``laplace.ParametricLaplace`` (registered with laplace-torch's factory
under ``hessian_structure="rank1inv"``; ``Rank1invLLLaplace`` for the last layer), so a
laplace-torch workflow changes one string::

    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure="rank1inv")
    la.fit(train_loader)
    la.optimize_prior_precision(method="marglik")
    probs = la(x, pred_type="glm", link_approx="probit")

The posterior precision is FullLaplace's, P = Λ₀ + c·RᵀR with c = 1/(σ²·T), kept as its m
curvature rows R (m×d) instead of the d×d matrix: per-sample gradients for the empirical Fisher
("ef"), C rows per sample √p_k(J_k − pᵀJ) for the GGN of a softmax likelihood ("ggn", also the
exact Fisher), or sampled-label gradients ("fisher", MC). Every query is exact: P⁻¹ is a
``rank1inv.StaticInverse`` over R (Woodbury with float64 accumulation), log det P comes from the
spectrum of RRᵀ, and the marginal likelihood is differentiable in the prior precision and σ
(laplace-torch's ``optimize_prior_precision`` and marglik training run unchanged). Cost: fit
O(md) memory for R (float32, bfloat16 or a memory map, or split along d over ranks with
``comm=``, or as a Dask array of column blocks with ``chunks=``) plus O(dm²) once; a GLM
predictive O(d·m·C) per input; a sample O(dm).
"""

from __future__ import annotations

import math
from collections.abc import MutableMapping

import numpy as np
import torch  # noqa: TID253 (this module is the adapter)

try:
    import tqdm
    from laplace.baselaplace import ParametricLaplace
    from laplace.curvature.curvature import EFInterface, GGNInterface
    from laplace.utils.enums import Likelihood
except ImportError as err:  # pragma: no cover - exercised where laplace-torch is absent
    raise ImportError("rank1inv.adapters.laplace_torch needs laplace-torch: pip install 'rank1inv[laplace]'") from err
except RuntimeError as err:  # pragma: no cover - a torchvision built for another torch
    if "torchvision" not in str(err):
        raise
    raise ImportError(
        "laplace-torch failed to import because the installed torchvision does not match this torch "
        f"({err}); laplace-torch runs without torchvision: pip uninstall -y torchvision"
    ) from err

from .. import _backend, _comm, _passes, _precision, chunked
from .. import laplace as _laplace
from ..static import StaticInverse
from .torch.convert import to_array
from .torch.jacobians import functional_model

__all__ = ["Rank1invLaplace", "Rank1invLLLaplace", "CURVATURES"]

CURVATURES = ("ef", "ggn", "fisher")
STORAGE = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DENSE_LIMIT = 4096  # largest d for which the d×d posterior_precision/covariance/scale are formed
SAMPLE_CHUNK = 16  # posterior samples drawn per pass over R


def _curvature_of(backend, backend_kwargs, curvature) -> tuple[str, int]:
    """(curvature kind, MC samples per datum) from ``curvature`` or, when None, from the
    laplace-torch backend class it mirrors (an EF backend → "ef", a GGN backend → "ggn", or
    "fisher" with ``backend_kwargs`` stochastic=True; default: laplace-torch's CurvlinopsGGN)."""
    kwargs = dict(backend_kwargs or {})
    samples = kwargs.get("num_samples", 1)
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {samples!r}")
    if curvature is not None:
        if curvature not in CURVATURES:
            raise ValueError(f"curvature must be one of {CURVATURES}, got {curvature!r}")
        return curvature, samples
    if backend is None or (isinstance(backend, type) and issubclass(backend, GGNInterface)):
        return ("fisher" if kwargs.get("stochastic", False) else "ggn"), samples
    if isinstance(backend, type) and issubclass(backend, EFInterface):
        return "ef", samples
    raise ValueError(
        f"backend {backend!r} has no curvature rows (exact Hessians are not sums of outer products): pass an EF or "
        f"GGN backend of laplace-torch, or curvature= one of {CURVATURES}"
    )


def _storage_of(storage, model_dtype: torch.dtype) -> torch.dtype:
    if storage is None:
        return model_dtype
    if isinstance(storage, torch.dtype) and storage in STORAGE.values():
        return storage
    if isinstance(storage, str) and storage in STORAGE:
        return STORAGE[storage]
    raise ValueError(f"storage must be None (the model's dtype) or one of {sorted(STORAGE)}, got {storage!r}")


def _read_columns(path: str, dtype, shape: tuple, a: int, b: int) -> np.ndarray:
    """Columns a:b of the (m, d) rows in the memory map at ``path`` (a Dask task: it runs where
    the scheduler puts it). bfloat16 rows are stored as their uint16 bit patterns."""
    stored = np.uint16 if dtype == np.dtype(_precision.numpy_dtype("bfloat16")) else dtype
    return np.array(np.memmap(path, dtype=stored, mode="r", shape=shape)[:, a:b]).view(dtype)


def _computed(a):
    """A Dask result computed (the array itself otherwise)."""
    return a.compute() if _backend.is_dask_array(a) else a


class Rank1invLaplace(ParametricLaplace):
    """Exact full-network Laplace (FullLaplace's posterior) over curvature rows.

    Constructed like laplace-torch's ``FullLaplace(model, likelihood, ...)`` (same arguments,
    ``backend`` chooses the curvature as there: EF backends the empirical Fisher, GGN backends
    the GGN, ``backend_kwargs={"stochastic": True, "num_samples": S}`` the sampled Fisher), plus,
    keyword-only:

    curvature : None, "ef", "ggn" or "fisher" (overrides what ``backend`` implies)
    storage : None (the model's dtype), "float64", "float32", "bfloat16" or "float16": the dtype
        of the m×d rows R (queries still accumulate in float64)
    storage_path : None, or a file for R as a memory map (written by ``fit``)
    comm : None, "torch", a torch.distributed process group or a rank1inv Communicator: R split
        along d over the ranks (each keeps its contiguous slice of coordinates; every rank runs
        the same model on the same data and gets the same answers)
    chunks : None, or a column-block width w: the passes over R run through Dask
        (``rank1inv.chunked.DaskInverse``: one task per block of w coordinates, on the current
        Dask scheduler or ``dask.distributed`` Client; with ``storage_path`` each task reads its
        columns from the memory map, a file every worker must be able to open, else the blocks
        are sliced from the rows in memory). Dask runs the passes of a scalar prior precision
        with d > m; per-tensor and per-coordinate priors and d ≤ m run in this process (Dask's
        operator takes one damping value). Not with ``comm``.
    chunk : samples per vectorised Jacobian / per-sample-gradient call (memory chunk·C·d)
    generator : a torch.Generator for the labels the "fisher" curvature samples

    ``enable_backprop`` and dict (Hugging Face) inputs are refused. The prior precision may be
    a scalar, one per parameter tensor or one per coordinate, as in laplace-torch; the rows do
    not depend on it, so changing it costs O(m³) (scalar) or O(dm²) (otherwise), never a refit.
    """

    _key = ("all", "rank1inv")

    def __init__(self, model, likelihood, sigma_noise=1.0, prior_precision=1.0, prior_mean=0.0, temperature=1.0,
                 enable_backprop=False, dict_key_x="input_ids", dict_key_y="labels", backend=None,
                 backend_kwargs=None, asdl_fisher_kwargs=None, *, curvature=None, storage=None, storage_path=None,
                 comm=None, chunks=None, chunk: int = 32, generator=None):  # fmt: skip
        if likelihood not in (Likelihood.CLASSIFICATION, Likelihood.REGRESSION):
            raise ValueError(f"likelihood must be 'classification' or 'regression' here, got {likelihood!r}")
        if enable_backprop:
            raise ValueError("enable_backprop=True is not supported: rank1inv's products are not differentiable "
                             "in the inputs (use FullLaplace for that)")  # fmt: skip
        self._curvature, self._mc_samples = _curvature_of(backend, backend_kwargs, curvature)
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise ValueError(f"chunk must be a positive int, got {chunk!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {generator!r}")
        if chunks is not None:
            if isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1:
                raise ValueError(f"chunks must be None or a positive int (a column-block width), got {chunks!r}")
            if comm is not None:
                raise ValueError("chunks= (Dask) and comm= (ranks) are two ways to split R: pass one")
            chunked._dask()  # ImportError now, not at the first query
        self._chunk, self._generator, self._storage_path, self._chunks = chunk, generator, storage_path, chunks
        self._comm = None if comm is None else _comm.as_communicator(comm)
        self._cache: dict = {}
        self._mapped = False  # whether H is the memory map at storage_path (what chunks= tasks read)
        super().__init__(model, likelihood, sigma_noise, 1.0, 0.0, temperature, enable_backprop, dict_key_x,
                         dict_key_y, backend, backend_kwargs, asdl_fisher_kwargs)  # fmt: skip
        self._select_parameters(model)
        self.prior_precision = prior_precision  # checked against the selected parameters
        self.prior_mean = prior_mean
        self.mean = self.prior_mean
        self._storage = _storage_of(storage, self._dtype)
        if self._comm is None:
            self._columns = (0, self.n_params)
        else:
            r, p = self._comm.rank, self._comm.size
            self._columns = (r * self.n_params // p, (r + 1) * self.n_params // p)

    # -- which parameters -------------------------------------------------------------------
    def _select_parameters(self, model) -> None:
        """The parameters the posterior is over: every one with requires_grad (laplace-torch's
        rule); ``Rank1invLLLaplace`` narrows this to the last layer."""
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("the model has no parameter with requires_grad=True")
        self._use(named)

    def _use(self, named: list) -> None:
        """Make ``named`` (name, parameter) pairs the posterior's coordinates, in their order."""
        self._named = named
        self.params = [p for _, p in named]
        self._sizes = [p.numel() for p in self.params]
        self.n_params = sum(self._sizes)
        self.n_layers = len(self.params)

    @property
    def _device(self) -> torch.device:
        return self.params[0].device if getattr(self, "params", None) else next(self.model.parameters()).device

    @property
    def _dtype(self) -> torch.dtype:
        return self.params[0].dtype if getattr(self, "params", None) else next(self.model.parameters()).dtype

    # -- the curvature rows -----------------------------------------------------------------
    def _init_H(self) -> None:
        self.H = None  # the rows R (m, d or this rank's columns) as a tensor once fitted

    @property
    def curvature(self) -> str:
        """The kind of curvature rows: "ef", "ggn" or "fisher"."""
        return self._curvature

    @property
    def num_rows(self) -> int:
        """m, the number of curvature rows (0 before ``fit``)."""
        return 0 if self.H is None else int(self.H.shape[0])

    def _rows_per_datum(self, n_outputs: int) -> int:
        if self._curvature == "ef":
            return 1
        return n_outputs if self._curvature == "ggn" else self._mc_samples

    def _functional(self):
        """f(params, x) for one input x, the other parameters and buffers held fixed."""
        return functional_model(self.model, [n for n, _ in self._named])

    def _params(self) -> dict:
        return {n: p.detach() for n, p in self._named}

    def _flat(self, tree: dict, lead: int) -> torch.Tensor:
        return torch.cat([tree[n].reshape(*tree[n].shape[:lead], -1) for n, _ in self._named], dim=lead)

    def _jacobians(self, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(Js (n, C, d), f (n, C)) at the fitted parameters: torch.func, ``chunk`` inputs at a
        time. Cost one reverse pass per output and input."""
        from torch.func import jacrev, vmap

        f = self._functional()
        params = self._params()

        def both(p, x):
            out = f(p, x)
            return out, out

        jac = vmap(jacrev(both, has_aux=True), in_dims=(None, 0))
        Js, fs = [], []
        for a in range(0, X.shape[0], self._chunk):
            J, out = jac(params, X[a : a + self._chunk])
            Js.append(self._flat(J, 2))
            fs.append(out)
        return torch.cat(Js).detach(), torch.cat(fs).detach()

    def _sample_gradients(self, X, targets, loss) -> torch.Tensor:
        """(n, d): the gradient of loss(f(x_i), t_i) for each input, vmapped ``chunk`` at a time."""
        from torch.func import grad, vmap

        f = self._functional()
        params = self._params()

        def one(p, x, t):
            return loss(f(p, x)[None, ...], t[None, ...])

        g = vmap(grad(one), in_dims=(None, 0, 0))
        return torch.cat([self._flat(g(params, X[a : a + self._chunk], targets[a : a + self._chunk]), 1)
                          for a in range(0, X.shape[0], self._chunk)]).detach()  # fmt: skip

    def _loss_function(self):
        if self.likelihood == Likelihood.REGRESSION:
            return torch.nn.MSELoss(reduction="sum"), 0.5  # ½‖f − y‖² is N(y | f, 1)
        return torch.nn.CrossEntropyLoss(reduction="sum"), 1.0

    def _curv_closure(self, X, y, N):
        """(loss of the batch as laplace-torch counts it, the batch's curvature rows (k, d)).

        ef: √factor·∇ℓ(f(x_i), y_i), the rows of FullLaplace's EF backends; ggn: classification
        √p_k(J_k − pᵀJ) for k = 1..C (RᵀR = Jᵀ(diag p − ppᵀ)J), regression the C rows of J;
        fisher: ∇ℓ(f(x_i), ŷ)/√S for S labels ŷ drawn from the model's predictive."""
        lossfunc, factor = self._loss_function()
        with torch.no_grad():
            f = self.model(X)
            loss = factor * lossfunc(f, y)
        if self._curvature == "ef":
            return loss, math.sqrt(factor) * self._sample_gradients(X, y, lossfunc)
        if self._curvature == "ggn":
            J, f = self._jacobians(X)
            if self.likelihood == Likelihood.REGRESSION:
                return loss, J.reshape(-1, J.shape[-1])
            p = torch.softmax(f, dim=-1)
            mean = torch.einsum("bc,bcd->bd", p, J)
            return loss, (p.sqrt()[..., None] * (J - mean[:, None, :])).reshape(-1, J.shape[-1])
        rows = []
        for _ in range(self._mc_samples):
            if self.likelihood == Likelihood.REGRESSION:
                eps = torch.randn(f.shape, generator=self._generator, dtype=f.dtype).to(f.device)
                rows.append(self._sample_gradients(X, f + eps, lossfunc) * factor)  # ½∇‖f − f̂ − ε‖² = −εᵀJ
            else:
                labels = torch.multinomial(torch.softmax(f, dim=-1).cpu(), 1, generator=self._generator)[:, 0]
                rows.append(self._sample_gradients(X, labels.to(f.device), lossfunc))
        return loss, torch.stack(rows, dim=1).reshape(-1, rows[0].shape[-1]) / math.sqrt(self._mc_samples)

    def _allocate(self, m: int) -> torch.Tensor:
        lo, hi = self._columns
        if self._storage_path is None:
            return torch.empty((m, hi - lo), dtype=self._storage, device=self._device)
        if self._device.type != "cpu":
            raise ValueError("storage_path (a memory map) needs a model on the CPU")
        bits = self._storage == torch.bfloat16  # NumPy has no bfloat16: its bit patterns as uint16
        numpy_dtype = np.uint16 if bits else torch.empty(0, dtype=self._storage).numpy().dtype
        mapped = np.memmap(self._storage_path, dtype=numpy_dtype, mode="w+", shape=(m, hi - lo))
        t = torch.from_numpy(mapped)
        return t.view(torch.bfloat16) if bits else t

    def fit(self, train_loader, override: bool = True, progress_bar: bool = False) -> None:
        """Compute the curvature rows over ``train_loader`` (batches (X, y); N =
        len(train_loader.dataset)) and the training loss, at the model's current parameters,
        as laplace-torch's fit does (the model is put in eval mode, as there). override=False
        appends to the rows of an earlier fit (a sequential posterior). Cost: one vectorised
        per-sample gradient (ef), Jacobian (ggn) or S gradients (fisher) per datum; memory the
        rows, m·d (or this rank's columns) in ``storage``."""
        self.model.eval()
        first = next(iter(train_loader))
        if isinstance(first, MutableMapping) or not isinstance(first[0], torch.Tensor):
            raise TypeError("fit takes batches (X, y) of tensors; dict (Hugging Face) inputs are not supported here")
        with torch.no_grad():
            out = self.model(first[0][:1].to(self._device))
        n_outputs = out.shape[-1]
        N = len(train_loader.dataset)
        if not override and self.H is not None and n_outputs != self.n_outputs:
            raise ValueError(f"the model now has {n_outputs} outputs, the earlier fit {self.n_outputs}")
        mean = torch.nn.utils.parameters_to_vector(self.params).detach()
        per = self._rows_per_datum(n_outputs)
        rows, filled, loss = self._allocate(N * per), 0, 0.0
        lo, hi = self._columns
        for X, y in tqdm.tqdm(train_loader, disable=not progress_bar, desc="[Computing curvature rows]"):
            X, y = X.to(self._device), y.to(self._device)
            if self.likelihood == Likelihood.REGRESSION and y.ndim != out.ndim:
                raise ValueError(f"The model's output has {out.ndim} dims but the target has {y.ndim} dims.")
            loss_batch, R = self._curv_closure(X, y, N)
            if filled + R.shape[0] > rows.shape[0]:  # the loader yields more than its dataset's length
                if self._storage_path is not None:
                    raise ValueError("train_loader yielded more samples than len(train_loader.dataset)")
                rows = torch.cat([rows[:filled], rows.new_empty((R.shape[0], hi - lo))])
            rows[filled : filled + R.shape[0]] = R[:, lo:hi]
            filled += R.shape[0]
            loss = loss + loss_batch
        if filled == 0:
            raise ValueError("train_loader yielded no data")
        rows = rows[:filled]
        mapped = self._storage_path is not None  # H is the file's first ``filled`` rows
        if not override and self.H is not None:
            rows, mapped = torch.cat([self.H, rows]), False  # in memory
            self.loss, self.n_data = self.loss + loss, self.n_data + N
        else:
            self.loss, self.n_data = loss, N
        self.H, self.mean, self._cache, self.n_outputs = rows, mean, {}, n_outputs  # nothing changes before here
        self._posterior_scale, self._mapped = None, mapped

    # -- the posterior as a rank1inv operator -------------------------------------------------
    def _rows(self):
        self._check_H_init()
        return to_array(self.H)

    def _dask_rows(self):
        """R as a Dask array (m, d) of column blocks of width ``chunks`` (built once per fit):
        tasks that read their columns from the memory map while H is that map, else blocks
        sliced from R in memory."""
        if "dask_rows" not in self._cache:
            import dask.array as da

            rows = self._rows()
            m, d = rows.shape
            if not self._mapped:  # (a refit with override=False or a loaded state holds R in memory)
                self._cache["dask_rows"] = da.from_array(rows, chunks=(m, self._chunks), name=False)  # no hash of R
            else:
                from dask import delayed

                def block(a: int):
                    b = min(a + self._chunks, d)
                    task = delayed(_read_columns, pure=False)(str(self._storage_path), rows.dtype, (m, d), a, b)
                    return da.from_delayed(task, (m, b - a), dtype=rows.dtype)

                self._cache["dask_rows"] = da.concatenate([block(a) for a in range(0, d, self._chunks)], axis=1)
        return self._cache["dask_rows"]

    def _on_dask(self, damp) -> bool:
        """Whether the operator for ``damp`` runs over Dask: ``chunks`` set, one damping value, d > m."""
        return self._chunks is not None and isinstance(damp, float) and self.n_params > self.num_rows

    def _inverse(self, damp, c: float) -> StaticInverse:
        """StaticInverse over R (Dask's when ``_on_dask``): O(dm²)."""
        rows = self._dask_rows() if self._on_dask(damp) else self._rows()
        return StaticInverse(rows, damp, scale=c, comm=self._comm)

    def _prior_damp(self, prior: torch.Tensor | None = None):
        """The prior precision as StaticInverse's damp: a float, or this rank's per-coordinate
        values (NumPy float64)."""
        prior = self.prior_precision if prior is None else prior
        values = prior.detach().to(torch.float64).cpu()
        if values.numel() == 1:
            return float(values.reshape(()))
        if values.numel() == self.n_layers:
            values = torch.repeat_interleave(values, torch.tensor(self._sizes))
        lo, hi = self._columns
        return values[lo:hi].numpy().copy()

    def _operator_at(self, prior: torch.Tensor, c: float) -> StaticInverse:
        damp = self._prior_damp(prior)
        key = (damp if isinstance(damp, float) else damp.tobytes(), c)
        cached = self._cache.get("op")
        if cached is not None and cached[0] == key:
            return cached[1]
        if cached is not None and cached[0][1] == c and isinstance(damp, float) and isinstance(cached[0][0], float):
            op = cached[1].with_damp(damp)  # O(m³): the rows' Gram matrix is kept
        else:
            op = self._inverse(damp, c)
        self._cache["op"] = (key, op)
        return op

    @property
    def posterior(self) -> StaticInverse:
        """P⁻¹ as a ``rank1inv.StaticInverse`` at the current prior precision and σ (products,
        diag, entries, samples, logdet; over ``comm``, this rank's columns). Built once per
        prior: O(dm²) the first time, O(m³) for a new scalar prior."""
        return self._operator_at(self.prior_precision, float(self._H_factor))

    # -- log det P, differentiable in the prior precision and σ ------------------------------
    def _spectrum(self) -> torch.Tensor:
        """Eigenvalues of RRᵀ (those that can be nonzero), float64; O(m³) once per fit."""
        if "spectrum" not in self._cache:
            cached = self._cache.get("op")
            if cached is not None and isinstance(cached[0][0], float):  # any scalar prior: the same Gram matrix
                op = cached[1]
            elif self.prior_precision.numel() == 1:  # the posterior operator itself, kept for what follows
                op = self.posterior
            else:
                op = self._inverse(1.0, 1.0)
            spectrum = np.asarray(op.gram_spectra()[0], dtype=np.float64) / op.scale
            self._cache["spectrum"] = torch.as_tensor(spectrum)
        return self._cache["spectrum"]

    def _dense_side(self) -> bool:
        return self._comm is None and self.n_params <= self.num_rows

    def _column_gram(self) -> torch.Tensor:
        """RᵀR (d, d) float64, for d ≤ m (one process); O(md²) once per fit."""
        if "column_gram" not in self._cache:
            rows = self._rows()
            xp = _backend.namespace(rows)
            out = _passes.column_gram(xp, rows[None, ...], "float64")[0]
            self._cache["column_gram"] = torch.as_tensor(_backend.to_host(out))
        return self._cache["column_gram"]

    def _layer_grams(self) -> torch.Tensor:
        """R_l R_lᵀ (L, m, m) float64 for each parameter tensor's columns (summed over ranks);
        O(m²d) once per fit, L·m²·8 bytes."""
        if "layer_grams" not in self._cache:
            dask = self._on_dask(1.0)
            rows = self._dask_rows() if dask else self._rows()
            xp = _backend.namespace(rows._meta if dask else rows)
            lo, hi = self._columns
            m, out, start = rows.shape[0], [], 0
            for size in self._sizes:
                a, b = max(start, lo) - lo, min(start + size, hi) - lo
                start += size
                if b <= a:
                    part = np.zeros((m, m))
                elif dask:  # one task per column block of this tensor
                    part = _passes.gram(xp, chunked.ChunkedView(rows[:, a:b]), "float64")[0]
                else:
                    part = _passes.gram(xp, rows[None, :, a:b], "float64")[0]
                out.append(_backend.to_host(part))
            grams = np.stack(out)
            if self._comm is not None:
                grams = self._comm.allreduce_sum(grams)
            self._cache["layer_grams"] = torch.as_tensor(grams)
        return self._cache["layer_grams"]

    def _log_det_ratio(self, prior: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """log det P − log det Λ₀ (float64, differentiable in prior and c = 1/(σ²T)):
        scalar λ: Σ log1p(c·sᵢ/λ) over the spectrum of RRᵀ (O(m));
        per tensor or coordinate with d ≤ m: log det(Λ₀ + c·RᵀR) − Σ log δ (Cholesky, O(d³));
        per tensor, d > m: log det(I + c·Σ_l R_lR_lᵀ/λ_l) (Cholesky, O(m³ + L·m²));
        per coordinate, d > m: the operator's log det, its gradient diag(P⁻¹) (O(dm²))."""
        prior = prior.to(torch.float64).reshape(-1)
        c = torch.as_tensor(c).to(device=prior.device, dtype=torch.float64)
        if prior.numel() == 1:
            return torch.log1p(c * self._spectrum().to(prior.device) / prior[0]).sum()
        sizes = torch.tensor(self._sizes, device=prior.device)
        diag = torch.repeat_interleave(prior, sizes) if prior.numel() == self.n_layers else prior
        if self._dense_side():
            L = torch.linalg.cholesky(c * self._column_gram().to(prior.device) + torch.diag(diag))
            return 2.0 * torch.log(torch.diagonal(L)).sum() - torch.log(diag).sum()
        if prior.numel() == self.n_layers and self.n_layers != self.n_params:
            K = self._layer_grams().to(prior.device)
            M = torch.eye(K.shape[1], dtype=torch.float64, device=prior.device) + c * torch.einsum(
                "l,lij->ij", 1.0 / prior, K
            )
            return 2.0 * torch.log(torch.diagonal(torch.linalg.cholesky(M))).sum()
        return _PerCoordinateLogDet.apply(diag, c, self) - torch.log(diag).sum()

    @property
    def log_det_ratio(self) -> torch.Tensor:
        """log det P − log det Λ₀, differentiable in the prior precision and σ (see
        ``_log_det_ratio`` for the cost of each prior structure); the model's dtype."""
        return self._log_det_ratio(self.prior_precision, self._H_factor).to(self._dtype)

    @property
    def log_det_posterior_precision(self) -> torch.Tensor:
        """log det P = ``log_det_ratio`` + log det Λ₀ (O(d) more)."""
        return self.log_det_ratio + self.log_det_prior_precision

    # -- products, predictive, samples -------------------------------------------------------
    def _local(self, J: torch.Tensor):
        """This rank's columns of (…, d) as a float64 NumPy/CuPy array."""
        lo, hi = self._columns
        return to_array(J[..., lo:hi].to(torch.float64).contiguous())

    def _all_ranks(self, a):
        """A host float64 array summed over the ranks (itself on one process)."""
        a = np.asarray(_backend.to_host(a), dtype=np.float64)
        return a if self._comm is None else self._comm.allreduce_sum(a)

    def _gathered(self, local) -> np.ndarray:
        """(…, d) host float64 from this rank's columns (…, d_local) of every rank (zero-padded
        and summed over the ranks: O(d) values per row); ``local`` itself on one process."""
        local = np.asarray(_backend.to_host(local), dtype=np.float64)
        if self._comm is None:
            return local
        lo, hi = self._columns
        full = np.zeros(local.shape[:-1] + (self.n_params,))
        full[..., lo:hi] = local
        return self._comm.allreduce_sum(full)

    def _out(self, a) -> torch.Tensor:
        return torch.as_tensor(np.asarray(a), dtype=self._dtype, device=self._device)

    def functional_variance(self, Js: torch.Tensor) -> torch.Tensor:
        """J_i P⁻¹ J_iᵀ for every input: Js (n, C, d) → (n, C, C). ``chunk`` inputs per product
        with P⁻¹, O(d·m·C) each."""
        self._check_jacobians(Js)
        op = self.posterior
        n, C, _ = Js.shape
        parts = []
        for a in range(0, n, self._chunk):
            J = self._local(Js[a : a + self._chunk])  # (k, C, d_local)
            xp = _backend.namespace(J)
            k = J.shape[0]
            Y = _computed(op.matmat(xp.matrix_transpose(xp.reshape(J, (k * C, -1)))))  # (d_local, k·C)
            Y = xp.reshape(xp.matrix_transpose(Y), (k, C, -1))
            parts.append(_backend.to_host(J @ xp.matrix_transpose(Y)))
        V = self._all_ranks(np.concatenate(parts))
        return self._out((V + np.swapaxes(V, 1, 2)) / 2.0)

    def functional_covariance(self, Js: torch.Tensor) -> torch.Tensor:
        """J P⁻¹ Jᵀ for the stacked Jacobians: Js (n, C, d) → (n·C, n·C); O(d·m·n·C)."""
        self._check_jacobians(Js)
        n, C, d = Js.shape
        J = self._local(Js.reshape(n * C, d))
        V = _laplace.predictive_variance(self.posterior, J, full=True)  # lazy over Dask blocks
        return self._out(_backend.to_host(_computed(V)))

    @torch.no_grad()
    def _glm_predictive_distribution(self, X, joint: bool = False, diagonal_output: bool = False):
        if isinstance(X, MutableMapping):
            raise TypeError("dict (Hugging Face) inputs are not supported here")
        X = X.to(self._device)
        if joint:
            Js, f_mu = self._jacobians(X)
            return f_mu.flatten(), self.functional_covariance(Js)
        f_mu, f_var = [], []
        for a in range(0, X.shape[0], self._chunk):  # the Jacobians of ``chunk`` inputs at a time
            Js, f = self._jacobians(X[a : a + self._chunk])
            f_mu.append(f)
            f_var.append(self.functional_variance(Js))
        V = torch.cat(f_var)
        return torch.cat(f_mu), (torch.diagonal(V, dim1=-2, dim2=-1) if diagonal_output else V)

    def sample(self, n_samples: int = 100, generator: torch.Generator | None = None) -> torch.Tensor:
        """(n_samples, d) exact draws from N(θ_MAP, P⁻¹) (``StaticInverse.sample_from_noise`` of
        standard normals from ``generator``; over ``comm`` the same draws as on one process,
        gathered). O(dm) each, ``SAMPLE_CHUNK`` per pass over R."""
        if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
            raise ValueError(f"n_samples must be a positive int, got {n_samples!r}")
        op = self.posterior
        lo, hi = self._columns
        d = self.n_params
        extra = op.noise_dim - (hi - lo)  # one value per row of each Woodbury block
        out = torch.empty((n_samples, d), dtype=self._dtype, device=self._device)
        for a in range(0, n_samples, SAMPLE_CHUNK):
            k = min(n_samples, a + SAMPLE_CHUNK) - a
            z = torch.randn((k, d + extra), generator=generator, dtype=torch.float64, device=self._device)
            x = _computed(op.sample_from_noise(to_array(torch.cat([z[:, lo:hi], z[:, d:]], dim=1))))
            out[a : a + k] = torch.as_tensor(self._gathered(x), dtype=self._dtype)
        return self.mean.reshape(1, d) + out

    def square_norm(self, value: torch.Tensor) -> torch.Tensor:
        """(θ − θ_MAP)ᵀ P (θ − θ_MAP): O(dm) (one product with P)."""
        delta = self._local(value - self.mean)
        Pd = _computed(self.posterior.fisher() @ delta)
        return self._out(self._all_ranks(float(_backend.to_host((delta * Pd).sum()))))

    # -- dense views where they fit ----------------------------------------------------------
    def _dense(self, what: str):
        if self._comm is not None:
            raise ValueError(f"{what} is a d×d matrix; over comm= every rank holds only its columns")
        if self.n_params > DENSE_LIMIT:
            raise ValueError(f"{what} would be a {self.n_params}×{self.n_params} matrix (d > {DENSE_LIMIT}): use "
                             "posterior_variance, functional_variance, sample or the posterior operator")  # fmt: skip
        return self.posterior

    @property
    def posterior_precision(self) -> torch.Tensor:
        """P (d, d), only for d ≤ DENSE_LIMIT."""
        return self._out(_backend.to_host(_computed(self._dense("posterior_precision").fisher().to_dense())))

    @property
    def posterior_covariance(self) -> torch.Tensor:
        """P⁻¹ (d, d), only for d ≤ DENSE_LIMIT."""
        return self._out(_backend.to_host(_computed(self._dense("posterior_covariance").to_dense())))

    @property
    def posterior_scale(self) -> torch.Tensor:
        """P^(-1/2) (d, d, symmetric), only for d ≤ DENSE_LIMIT."""
        return self._out(_backend.to_host(_computed(self._dense("posterior_scale").power(-0.5).to_dense())))

    @property
    def posterior_variance(self) -> torch.Tensor:
        """diag(P⁻¹), (d,): O(dm²) once per prior (a whitening of R), then O(dm)."""
        return self._out(self._gathered(_computed(self.posterior.diag())))

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """laplace-torch's state plus the curvature kind; "H" is the rows R (over ``comm``, this
        rank's columns)."""
        state = super().state_dict()
        state.update(curvature=self._curvature, mc_samples=self._mc_samples, columns=self._columns)
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a ``state_dict()`` (laplace-torch's checks, plus: the same curvature and column
        split); the cached operator is rebuilt at the next query (O(dm²))."""
        saved = {"curvature": state_dict.get("curvature"), "columns": tuple(state_dict.get("columns", ()))}
        for key, mine in (("curvature", self._curvature), ("columns", tuple(self._columns))):
            if saved[key] != mine:
                raise ValueError(f"the state was saved with {key}={saved[key]!r}, this object has {mine!r}")
        super().load_state_dict(state_dict)
        self._mapped = False  # H is the state's tensor, not the memory map
        self._cache = {}


class _PerCoordinateLogDet(torch.autograd.Function):
    """log det(diag(δ) + c·RᵀR) for d > m, with ∂/∂δ = diag(P⁻¹) and ∂/∂c = Σᵢ rᵢᵀP⁻¹rᵢ
    (O(dm²) each, from the operator)."""

    @staticmethod
    def forward(ctx, diag, c, la):
        op = la._operator_at(diag, float(c))
        ctx.op, ctx.la = op, la
        return torch.tensor(op.logdet(), dtype=torch.float64, device=diag.device)

    @staticmethod
    def backward(ctx, grad):
        op, la = ctx.op, ctx.la
        d_diag = d_c = None
        if ctx.needs_input_grad[0]:
            d_diag = grad * torch.as_tensor(la._gathered(_computed(op.diag())), device=grad.device)
        if ctx.needs_input_grad[1]:
            H = la.H
            quad = [_backend.to_host(_laplace.predictive_variance(op, to_array(H[a : a + 64].to(torch.float64))))
                    for a in range(0, H.shape[0], 64)]  # rᵢᵀP⁻¹rᵢ  # fmt: skip
            d_c = grad * math.fsum(np.concatenate(quad).tolist())
        return d_diag, d_c, None


class Rank1invLLLaplace(Rank1invLaplace):
    """``Rank1invLaplace`` over the last layer's parameters only (laplace-torch's
    ``subset_of_weights="last_layer"``): the last module with parameters of its own, or
    ``last_layer_name``. The rest of the network is held fixed (its requires_grad flags are
    not touched)."""

    _key = ("last_layer", "rank1inv")

    def __init__(self, model, likelihood, *args, last_layer_name: str | None = None, **kwargs):
        self._last_layer_name = last_layer_name
        super().__init__(model, likelihood, *args, **kwargs)

    def _select_parameters(self, model) -> None:
        modules = dict(model.named_modules())
        name = self._last_layer_name
        if name is None:
            owners = [n for n, mod in modules.items() if any(True for _ in mod.parameters(recurse=False))]
            if not owners:
                raise ValueError("the model has no parameters")
            name = owners[-1]
        elif name not in modules:
            raise ValueError(f"last_layer_name {name!r} is not a module of the model")
        prefix = f"{name}." if name else ""
        self._use([(prefix + n, p) for n, p in modules[name].named_parameters(recurse=False)])
