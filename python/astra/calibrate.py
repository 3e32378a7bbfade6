"""k-means calibration of per-layer codebooks from the hidden states of sample inputs.

For every layer the hidden states ``h`` entering the attention's Q/K/V projection (the vectors ASTRA
quantizes) are collected from full-precision forwards of the unmodified model over the samples (padding
tokens excluded), moved into a basis of :mod:`astra.bases` (``basis``), cut into G groups, and clustered
per group with k-means: ``faiss.Kmeans`` when faiss is importable (``backend="auto"``), else seeded Lloyd
iterations in torch. With ``world_size=N`` layer l is calibrated instead on the vectors it quantizes in an
N-rank ASTRA simulation whose layers < l already use their calibrated codebooks (the distribution inference
sees). The paper trains codebooks jointly with fine-tuning (:func:`astra.finetune`); this is the cheap post-hoc
starting point.
"""
from __future__ import annotations

import contextlib
import importlib.util
import warnings
from collections.abc import Sized
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Union

import torch

import astra_kernels as ak
from astra_kernels.checks import is_count
from . import bases
from .codebooks import Codebooks, apply_predictor, cast_checked
from .context import position_ids
from .errors import NonFiniteError
from .inputs import batches, checked_batch, seq_geometry
from .models import check_has_weights, family_of
from .split import resolve_class_token
from .weights_sample import weights_sample

BACKENDS = ("auto", "faiss", "torch")


def faiss_available() -> bool:
    return importlib.util.find_spec("faiss") is not None


def check_backend(backend: str) -> None:
    """ValueError for an unknown k-means ``backend``; ModuleNotFoundError (``name="faiss"``) for ``"faiss"`` without
    faiss installed: before any work (it was found after every hidden state had been collected)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "faiss" and not faiss_available():
        raise ModuleNotFoundError("backend='faiss' needs the faiss package (pip install faiss-cpu)", name="faiss")


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """``model`` in eval mode for the body; afterwards (an error too) every submodule in the train/eval mode it had
    (``model.train(was_training)`` put the submodules a user had left in eval mode back in train mode)."""
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        yield
    finally:
        for m, training in modes.items():
            m.training = training


@torch.no_grad()
def collect_hidden_states(model, samples: Iterable[Dict[str, Any]], *, max_tokens: Optional[int] = None,
                          embeddings: bool = False):
    """Per layer, the ``[N, D]`` hidden states entering the attention projections (non-padding tokens). With
    ``embeddings``: ``(those, e)``, ``e [N, D]`` the same tokens' embedding outputs (an encoder's ``embeddings``
    module's, a decoder's :meth:`Family.embed`; None for a decoder whose adapter gives no ``embed``)."""
    fam = family_of(model)
    use_emb = embeddings and (fam.embeddings is not None or fam.adapter.embed is not None)
    per_layer: List[List[torch.Tensor]] = [[] for _ in range(fam.num_layers + use_emb)]
    current_mask: List[Optional[torch.Tensor]] = [None]

    def keep(slot, h):
        m = current_mask[0]
        x = h[m] if (m is not None and m.shape == h.shape[:2]) else h.reshape(-1, h.shape[-1])
        per_layer[slot].append(x.detach().float().cpu())

    handles = [m.register_forward_pre_hook(lambda mod, a, kw, l=l: keep(l, a[0] if a else kw["hidden_states"]),
                                           with_kwargs=True) for l, m in enumerate(fam.attn_modules)]
    if use_emb and fam.embeddings is not None:
        handles.append(fam.embeddings.register_forward_hook(lambda mod, a, out: keep(-1, out)))
    dev = next(model.parameters()).device
    try:
        n = 0
        for s in samples:
            m = s.get("attention_mask")
            current_mask[0] = m.bool() if m is not None else None
            model(**s)
            if use_emb and fam.embeddings is None:
                keep(-1, fam.embed(s, position_ids(fam, s, seq_geometry(fam, s)[1], dev)[0]))
            n += per_layer[0][-1].shape[0]
            if max_tokens is not None and n >= max_tokens:
                break
    finally:
        for h in handles:
            h.remove()
    out = [torch.cat(xs) for xs in per_layer]
    if out[0].shape[0] == 0:
        raise ValueError("the samples hold no attended token to calibrate on (every attention_mask entry is 0)")
    for slot, x in enumerate(out):
        bad = (~torch.isfinite(x)).any(dim=-1).nonzero()
        if bad.numel():
            where = "the embedding output" if slot == fam.num_layers else f"the hidden state entering layer {slot}"
            raise NonFiniteError(f"calibrate: {where} holds NaN or Inf (attended token {int(bad[0])} of the samples, "
                                 "in order): the model's weights or the samples are not finite")
    if max_tokens is not None:
        out = [x[:max_tokens] for x in out]
    if not embeddings:
        return out
    return (out[:-1], out[-1]) if use_emb else (out, None)


def lloyd_assign(xs: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """Nearest codeword per group for the Lloyd step, ``[N, G]``.

    Groups of at most :data:`astra_kernels.SMALL_GROUP_MAX_DIM` dims: the exact encode (its fused small-group
    scan never writes the ``[G, N, K]`` scores; 2-12-dim groups ran 2.3-3.5x faster than the GEMM below, same
    error). Larger groups: plain fp32 ``||c||^2 - 2 x.c`` argmin by GEMM (3x faster than the exact encode at
    384 dims: calibration needs a good assignment, not the certified one)."""
    G, N, d = xs.shape
    K = C.shape[1]
    if d <= ak.SMALL_GROUP_MAX_DIM:
        return ak.vq_encode(xs.transpose(0, 1).reshape(N, G * d), C).long()
    cn = (C * C).sum(-1).unsqueeze(1)                                    # [G, 1, K]
    step = max(1, (1 << 24) // max(1, G * K))
    out = []
    for i in range(0, N, step):
        s = torch.baddbmm(cn, xs[:, i: i + step], C.transpose(1, 2), alpha=-2.0)
        out.append(s.argmin(-1))
    return torch.cat(out, dim=1).t()


#: ``backend="auto"`` runs the torch Lloyd iterations instead of faiss for groups below this many dims: faiss's
#: k-means ran 4x slower there (20k vectors, 8 groups, K = 1024, 2 threads, 10 iterations: 2 and 4 dims faiss
#: 6.7 s, torch with the exact encode 1.7 s; 8 dims 0.8 s vs 1.9 s; the digits ViT's 2-dim groups, 23k tokens,
#: G = 32: 35.2 s vs 7.1 s, equal error; bench/RESULTS.md "Calibration speed")
FAISS_MIN_GROUP_DIM = 8


def kmeans(x: torch.Tensor, groups: int, k: int, *, iters: int = 15, seed: int = 0, backend: str = "auto",
           init_samples: int = 4096) -> torch.Tensor:
    """Grouped k-means: ``x [N, D]`` -> codebook ``[G, K, D/G]`` (float32).

    ``backend``: ``"faiss"`` (``faiss.Kmeans`` per group), ``"torch"`` (Lloyd in torch) or ``"auto"`` (faiss
    when importable, except for groups below :data:`FAISS_MIN_GROUP_DIM` dims); both seeded, k-means++ seeding
    for K <= 256. With fewer vectors than codewords the torch path is used (faiss cannot seed more centroids
    than points)."""
    check_backend(backend)
    if x.ndim != 2:
        raise ValueError(f"calibration vectors must be [N, D], got shape {tuple(x.shape)}")
    N, D = x.shape
    if D % groups:
        raise ValueError(f"hidden size {D} is not divisible by G={groups}")
    if N == 0:
        raise ValueError("no calibration vectors")
    if N < k:
        warnings.warn(f"k-means of {N} vectors into K={k} codewords: at most {N} of them differ, yet every code takes "
                      f"{ak.default_bits(k)} bits; calibrate on more tokens or choose a smaller codebook_size",
                      UserWarning, stacklevel=2)
    x = x.detach().float().cpu()
    use_faiss = backend == "faiss" or (backend == "auto" and D // groups >= FAISS_MIN_GROUP_DIM)
    if use_faiss and N >= k and faiss_available():
        return _kmeans_faiss(x, groups, k, iters=iters, seed=seed, init_samples=init_samples)
    return _kmeans_torch(x, groups, k, iters=iters, seed=seed, init_samples=init_samples)


def _kmeans_faiss(x: torch.Tensor, groups: int, k: int, *, iters: int, seed: int, init_samples: int) -> torch.Tensor:
    """faiss Lloyd iterations per group from the torch path's seeded initial centroids (so both backends run
    the same algorithm from the same start; faiss's own sampling may pick duplicate points)."""
    import faiss
    import numpy as np

    N, D = x.shape
    d = D // groups
    xs = x.reshape(N, groups, d).transpose(0, 1).contiguous()       # [G, N, d]
    init = _init_centroids(xs, k, torch.Generator().manual_seed(seed), init_samples)
    out = np.empty((groups, k, d), dtype=np.float32)
    for g in range(groups):
        km = faiss.Kmeans(d, k, niter=iters, seed=seed * 1000003 + g, verbose=False, min_points_per_centroid=1,
                          max_points_per_centroid=max(256, -(-N // k)))
        km.train(xs[g].numpy(), init_centroids=init[g].numpy())
        out[g] = km.centroids
    return torch.from_numpy(out)


def kmeans_error(x: torch.Tensor, codebook: torch.Tensor) -> float:
    """Mean squared quantization error of ``x [N, D]`` under ``codebook [G, K, D/G]`` (per element)."""
    G, K, d = codebook.shape
    xs = x.detach().float().reshape(x.shape[0], G, d).transpose(0, 1).contiguous()
    C = codebook.detach().float()
    codes = lloyd_assign(xs, C)                                                # [N, G]
    q = C[torch.arange(G)[None, :], codes]                                # [N, G, d]
    return float((q.transpose(0, 1) - xs).pow(2).mean())


def _init_centroids(xs: torch.Tensor, k: int, g: torch.Generator, init_samples: int) -> torch.Tensor:
    """Seeded initial centroids ``[G, k, d]`` of ``xs [G, N, d]``: k-means++ on a sub-sample for k <= 256, else
    random distinct data points (jittered copies when there are fewer distinct points than codewords)."""
    groups, N, d = xs.shape
    C = torch.empty(groups, k, d)
    if k <= 256:
        sub = xs[:, torch.randperm(N, generator=g)[: min(N, init_samples)]]
        M = sub.shape[1]
        first = torch.randint(0, M, (groups,), generator=g)
        C[:, 0] = sub[torch.arange(groups), first]
        dmin = ((sub - C[:, :1]) ** 2).sum(-1)                          # [G, M]
        for j in range(1, k):
            w = dmin.clamp_min(0) + 1e-12
            idx = torch.multinomial(w, 1, generator=g)[:, 0]
            C[:, j] = sub[torch.arange(groups), idx]
            dmin = torch.minimum(dmin, ((sub - C[:, j: j + 1]) ** 2).sum(-1))
        return C
    for gi in range(groups):   # duplicated codewords would only create exact ties
        u = torch.unique(xs[gi], dim=0)
        u = u[torch.randperm(u.shape[0], generator=g)]
        if u.shape[0] >= k:
            C[gi] = u[:k]
        else:
            extra = u[torch.randint(0, u.shape[0], (k - u.shape[0],), generator=g)]
            scale = u.std(0, keepdim=True).clamp_min(1e-6) * 1e-3
            C[gi] = torch.cat([u, extra + torch.randn(extra.shape, generator=g) * scale])
    return C


def _kmeans_torch(x: torch.Tensor, groups: int, k: int, *, iters: int, seed: int, init_samples: int) -> torch.Tensor:
    N, D = x.shape
    d = D // groups
    g = torch.Generator().manual_seed(seed)
    xs = x.reshape(N, groups, d).transpose(0, 1).contiguous()       # [G, N, d]
    C = _init_centroids(xs, k, g, init_samples)
    for _ in range(iters):
        codes = lloyd_assign(xs, C)                                          # [N, G]
        flat = (codes.t() + torch.arange(groups).unsqueeze(1) * k).reshape(-1)   # [G*N] into [G*K]
        sums = torch.zeros(groups * k, d).index_add_(0, flat, xs.reshape(-1, d)).view(groups, k, d)
        counts = torch.zeros(groups * k).index_add_(0, flat, torch.ones(groups * N)).view(groups, k)
        empty = counts == 0
        newC = sums / counts.clamp_min(1).unsqueeze(-1)
        if empty.any():  # re-seed empty clusters with random data points
            r = torch.randint(0, N, (int(empty.sum()),), generator=g)
            gi = empty.nonzero()[:, 0]
            newC[empty] = xs[gi, r]
        C = newC
    return C


def _checked_args(fam, samples, groups, codebook_size, iters, max_tokens, backend, world_size, predict,
                  seed=0, class_token="auto"):
    """:func:`calibrate`'s arguments checked before any forward (ValueError / TypeError naming the argument; each
    sample as :func:`astra.inputs.validate_inputs` checks a forward's inputs, a stream's as it is read); returns
    the samples (:func:`_read_samples`)."""
    if max_tokens is not None and not is_count(max_tokens, 1):
        raise ValueError(f"max_tokens must be None or an int >= 1, got {max_tokens!r}")
    if world_size is not None and not is_count(world_size, 2):
        raise ValueError(f"world_size must be None or an int >= 2 (at 1 no rank sends: nothing is quantized), got "
                         f"{world_size!r}")
    samples = _read_samples(fam, samples, max_tokens, world_size, resolve_class_token(fam, class_token))
    if not is_count(seed, 0):
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    check_backend(backend)
    if not is_count(groups, 1) or fam.hidden_size % groups:
        raise ValueError(f"hidden size {fam.hidden_size} is not divisible by G={groups}")
    if not is_count(codebook_size, 1) or codebook_size > ak.MAX_K:
        raise ValueError(f"codebook_size must be an int in 1..{ak.MAX_K}, got {codebook_size!r}")
    if not is_count(iters, 1):
        raise ValueError(f"iters must be an int >= 1, got {iters!r}")
    if predict and world_size is not None:
        raise ValueError("predict=True fits on the model's own hidden states; it does not take world_size")
    return samples


def _read_samples(fam, samples, max_tokens: Optional[int], world_size: Optional[int], cls: bool):
    """The samples, each checked as a forward at ``world_size`` ranks checks its inputs: a list, or for an iterator or
    generator (no ``len``) a :class:`_SampleStream` that reads it only as far as the forwards over it go (they stop
    at ``max_tokens`` tokens, or at ``max_tokens`` quantized vectors layer-wise), so a stream, endless or not, gives
    the codebooks the same samples as a list give."""
    samples = batches(samples, "samples")

    def check(i: int, s) -> Dict[str, Any]:
        # with world_size (layer-wise), every sample runs split over that many ranks: a shorter one failed mid-way
        return checked_batch(fam, s, "samples", i, world_size or 1, bool(world_size) and cls)

    out = [check(i, s) for i, s in enumerate(samples)] if isinstance(samples, Sized) else _SampleStream(samples, check)
    if next(iter(out), None) is None:      # (a stream reads its first sample here, checked)
        raise ValueError("calibrate needs at least one sample")
    return out


class _SampleStream:
    """Samples read from an iterator as the passes over them need them (each checked as it arrives) and kept for the
    next pass; a pass that stops early leaves the rest of the stream unread."""

    def __init__(self, source: Iterable, check: Callable):
        self._source, self._check, self._seen = iter(source), check, []

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        i = 0
        while True:
            if i == len(self._seen):
                try:
                    s = next(self._source)
                except StopIteration:
                    return
                self._seen.append(self._check(i, s))
            yield self._seen[i]
            i += 1


def calibrate(model, samples: Union[Dict[str, Any], Iterable[Dict[str, Any]]], *, groups: int = 1,
              codebook_size: int = 1024, iters: int = 15, seed: int = 0, max_tokens: Optional[int] = 20000,
              backend: str = "auto", world_size: Optional[int] = None, class_token="auto",
              basis: str = "auto", predict: bool = False, progress: bool = False) -> Codebooks:
    """Codebooks for ``model`` by k-means over the hidden states of ``samples`` (input dicts for
    ``model(**sample)``; a single dict is one sample). Deterministic for a given seed and backend.

    ``backend``: see :func:`kmeans`. ``world_size``: calibrate layer l on what it quantizes in a
    ``world_size``-rank simulation with layers < l already quantized (``class_token`` as in
    :func:`astra.simulate`); one forward pass over the samples per layer. ``basis`` (:mod:`astra.bases`): quantize
    each layer in its ``"attention"`` basis (the error measured as the attention output's), its ``"pca"``
    rotation, the model's own basis (``"none"``), or ``"auto"``: the attention basis for G > 1 where the family
    allows it, else the PCA rotation; none for G = 1. ``predict``: predictive codebooks (:class:`astra.Codebooks`):
    layer by layer, a ridge least-squares predictor of the hidden state from the token's embedding output and its
    reconstruction of the previous layer (as the runtimes compute it with the codebooks fitted so far), then k-means
    on the residuals; not with ``world_size``. ``progress``: a tqdm bar over layers.
    """
    from tqdm.auto import tqdm

    fam = family_of(model)
    check_has_weights(model)
    samples = _checked_args(fam, samples, groups, codebook_size, iters, max_tokens, backend, world_size, predict,
                            seed, class_token)
    basis = bases.resolve(basis, fam, groups)
    tensors: List[torch.Tensor] = []
    pairs: Optional[List[tuple]] = None if basis == "none" else []      # per layer (T, T^-1)
    bar = tqdm(range(fam.num_layers), desc=f"astra.calibrate[G={groups}, K={codebook_size}]", disable=not progress)
    with eval_mode(model), contextlib.closing(bar):
        if predict:
            fit = dict(groups=groups, k=codebook_size, iters=iters, seed=seed, backend=backend, basis=basis)
            hs, emb = collect_hidden_states(model, samples, max_tokens=max_tokens, embeddings=True)
            return _predictive(fam, next(model.parameters()).dtype, hs, emb, bar, fit)
        hs = collect_hidden_states(model, samples, max_tokens=max_tokens) if world_size is None else None
        for l in bar:
            if not fam.exchanged(l):
                C, pair = _placeholder(fam, groups, codebook_size, basis)
                tensors.append(C)
                if pairs is not None:
                    pairs.append(pair)
                continue
            h = hs[l] if hs is not None else _quantized_inputs(model, samples, tensors, pairs, l, world_size,
                                                                 class_token, max_tokens)
            if pairs is not None:
                pairs.append(tuple(t.to(h.dtype) for t in bases.layer_basis(fam, l, h, groups, basis)))
                h = h @ pairs[-1][0]
            tensors.append(kmeans(h, groups, codebook_size, iters=iters, seed=seed + l, backend=backend))
    return _codebooks(fam, next(model.parameters()).dtype, tensors, pairs)


def _placeholder(fam, groups: int, k: int, basis: str):
    """``(codebook, (T, T^-1) or None)`` of a layer no runtime quantizes (:meth:`Family.exchanged` False: every rank
    computes its inputs itself), which calibration does not fit: zeros and the identity
    (:attr:`Codebooks.placeholder_layers`)."""
    D = fam.hidden_size
    eye = torch.eye(D, dtype=torch.float64)
    return torch.zeros(groups, k, D // groups), None if basis == "none" else (eye, eye.clone())


def _codebooks(fam, dtype: torch.dtype, tensors: List[torch.Tensor], pairs: Optional[List[tuple]],
               predictors: Optional[List[tuple]] = None) -> Codebooks:
    """Codebooks of ``tensors`` in ``dtype``, with the per-layer ``(T, T^-1)`` ``pairs`` (None: untransformed) and
    ``(W, b)`` ``predictors`` (None: not predictive)."""
    cast = lambda ts: [cast_checked(t, "the calibrated codebooks", dtype) for t in ts]  # noqa: E731
    part = lambda ps, i: None if ps is None else cast(p[i] for p in ps)  # noqa: E731
    return Codebooks(cast(tensors), model_type=fam.name, hidden_size=fam.hidden_size,
                     transforms=part(pairs, 0), inverses=part(pairs, 1),
                     predictors=part(predictors, 0), predictor_biases=part(predictors, 1),
                     placeholder_layers=[l for l in range(len(tensors)) if not fam.exchanged(l)],
                     weights_sample=weights_sample(fam.model))


#: the ridge of the predictors' least squares, relative to the mean variance of their inputs
PREDICTOR_RIDGE = 1e-3


def fit_predictor(emb: Optional[torch.Tensor], prev: Optional[torch.Tensor], h: torch.Tensor):
    """Ridge least squares ``h ~ [emb, prev] @ W + b`` (float64): ``(W [2D, D], b [D])``, the half of ``W`` of an
    input that is None left zero."""
    D = h.shape[1]
    y = h.double()
    W = y.new_zeros(2 * D, D)
    parts = [(i, x.double()) for i, x in enumerate((emb, prev)) if x is not None]
    if not parts:
        return W, y.mean(0)
    x = torch.cat([p for _, p in parts], 1)
    mx, my = x.mean(0), y.mean(0)
    xc = x - mx
    gram = xc.t() @ xc
    gram.diagonal().add_(PREDICTOR_RIDGE * float(gram.diagonal().mean()))
    sol = torch.linalg.solve(gram, xc.t() @ (y - my))
    for j, (i, _) in enumerate(parts):
        W[i * D:(i + 1) * D] = sol[j * D:(j + 1) * D]
    return W, my - mx @ sol


def _predictive(fam, dtype: torch.dtype, hs: List[torch.Tensor], emb: Optional[torch.Tensor], bar, fit: dict
                ) -> Codebooks:
    """Predictive codebooks (see :func:`calibrate`'s ``predict``), fitted layer by layer in ``bar``."""
    tensors, pairs, predictors = [], [], []
    prev = None
    for l in bar:
        h = hs[l].double()
        if not fam.exchanged(l):        # the next layer predicts from h itself, which the receivers compute
            C, pair = _placeholder(fam, fit["groups"], fit["k"], fit["basis"])
            tensors.append(C)
            pairs.append(pair)
            predictors.append((h.new_zeros(2 * h.shape[1], h.shape[1]), h.new_zeros(h.shape[1])))
            prev = h
            continue
        W, b = fit_predictor(emb, prev, h)
        pred = apply_predictor(W, b, emb, prev)
        resid = h - pred
        pair = bases.layer_basis(fam, l, hs[l], fit["groups"], fit["basis"], quantized=resid)
        T, T_inv = pair if pair is not None else (None, None)
        y = (resid if T is None else resid @ T).float()
        C = kmeans(y, fit["groups"], fit["k"], iters=fit["iters"], seed=fit["seed"] + l, backend=fit["backend"])
        y_hat = ak.vq_decode(ak.vq_encode(y, C), C).double()
        prev = pred + (y_hat if T_inv is None else y_hat @ T_inv)     # what the next layer's prediction reads
        tensors.append(C)
        pairs.append(pair)
        predictors.append((W, b))
    return _codebooks(fam, dtype, tensors, None if pairs[0] is None else pairs, predictors)


@torch.no_grad()
def _quantized_inputs(model, samples, done: List[torch.Tensor], pairs: Optional[List[tuple]], layer: int,
                      world_size: int, class_token, max_tokens: Optional[int]) -> torch.Tensor:
    """The vectors layer ``layer`` quantizes in a ``world_size``-rank simulation with layers < ``layer`` quantized
    by the codebooks in ``done`` (later layers full precision)."""
    from .training import TrainSimRuntime

    fam = family_of(model)
    dtype = next(model.parameters()).dtype
    # layers >= ``layer`` are not quantized; their placeholder only satisfies Codebooks' shape checks
    fill = done[0].new_zeros(done[0].shape) if done else torch.zeros(1, 1, fam.hidden_size)
    rest = fam.num_layers - len(done)
    eye = torch.eye(fam.hidden_size, dtype=dtype)
    later = None if pairs is None else list(pairs) + [(eye, eye)] * rest
    cb = _codebooks(fam, dtype, list(done) + [fill] * rest, later)
    rt = TrainSimRuntime(model, cb, world_size, class_token, quantize_layers=layer, record_layer=layer)
    rt.install()
    try:
        for s in samples:
            rt.run(s)
            if max_tokens is not None and sum(r.shape[0] for r in rt.recorded) >= max_tokens:
                break
    finally:
        rt.uninstall()
    out = torch.cat(rt.recorded).float().cpu()
    return out[:max_tokens] if max_tokens is not None else out
