"""``astra.finetune``: train codebooks (and optionally the model) through the ASTRA simulation.

Every step runs the model exactly as :func:`astra.simulate` would at the step's world size, made differentiable
(:mod:`astra.training`): non-local tokens are quantized with a straight-through estimator, so gradients reach the
codebooks and the senders' hidden states. Loss = task loss + ``beta`` * commitment loss, where the commitment
loss is the mean squared quantization residual ``||h - C[code]||^2`` over every quantized token and layer. The
default task loss distils the unmodified model: KL divergence to its logits when the output has two or more
logits, else the mean squared error of the logits (one: a regression head, a reranker) or of ``last_hidden_state``,
relative to the reference's mean square (padding excluded).
"""
from __future__ import annotations

import copy
import itertools
import os
import random
from collections.abc import Sized
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch

from astra_kernels.checks import is_count, is_finite_real
from .calibrate import eval_mode
from .codebooks import Codebooks, as_codebooks
from .inputs import batches, checked_batch
from .models import family_of
from .training import TrainSimRuntime, training_class_token
from .weights_sample import weights_sample

CODEBOOKS_FILE = "codebooks.safetensors"
TRAIN_MODES = ("codebooks", "all")
#: lambda of noise-augmented quantization when ``naq`` is not given, per ``train`` mode. With the model frozen
#: the noise only makes the codebooks fit a noisier condition than inference sees: on MiniLM (ws 4, 94 steps)
#: ``train="codebooks"`` reached 0.9908 held-out cosine without it against 0.9889 with lambda = 1 at G = 32, and
#: 0.9423 against 0.9368 at G = 1 (bench/RESULTS.md, issue 8). The paper's NAQ hardens a model being trained.
NAQ_DEFAULT = {"codebooks": 0.0, "all": 1.0}
#: ``lr=None``: each layer's codebook learning rate is this times the mean absolute entry of its codebook, so the
#: (Adam) steps follow the codebooks' scale, which differs ~6x across models and codebook kinds (predictive
#: codebooks code residuals); bench/RESULTS.md, "The codebook learning rate"
LR_RELATIVE = 0.006


@dataclass
class FinetuneResult:
    codebooks: Codebooks                     # the trained codebooks (detached, the input's dtype)
    model: torch.nn.Module                   # the model (trained in place with train="all")
    losses: List[float] = field(default_factory=list)   # total loss of every step
    world_sizes: List[int] = field(default_factory=list)  # world size of every step
    output_dir: Optional[str] = None


def main_output(out) -> torch.Tensor:
    """The tensor the default loss distils: ``logits`` when present, else ``last_hidden_state``."""
    for key in ("logits", "last_hidden_state"):
        t = getattr(out, key, None)
        if t is not None:
            return t
    raise ValueError(f"cannot distil a model output without logits or last_hidden_state ({type(out).__name__})")


def distill_loss(out, ref, batch: Dict[str, Any]) -> torch.Tensor:
    """Default task loss: student output ``out`` vs the unmodified model's output ``ref`` (see module doc)."""
    s, t = main_output(out), main_output(ref).detach()
    mask = batch.get("attention_mask")
    rows = mask.bool() if mask is not None and mask.shape == s.shape[:2] and s.ndim == 3 else None
    if getattr(out, "logits", None) is not None and s.shape[-1] > 1:     # one logit (regression): its softmax is 1
        per = (torch.softmax(t.float(), -1) * (torch.log_softmax(t.float(), -1) - torch.log_softmax(s.float(), -1)))
        per = per.sum(-1)
        return per[rows].mean() if rows is not None else per.mean()
    err = (s.float() - t.float()).pow(2).mean(-1)
    ref2 = t.float().pow(2).mean(-1)
    if rows is not None:
        err, ref2 = err[rows], ref2[rows]
    return err.mean() / ref2.mean().clamp_min(1e-12)


def _world_sizes(world_size) -> List[int]:
    if isinstance(world_size, int):
        sizes = [world_size]
    elif isinstance(world_size, (list, tuple, set, range)):
        sizes = sorted(world_size) if isinstance(world_size, set) else list(world_size)
    else:
        sizes = []
    if not sizes or not all(is_count(n) for n in sizes):
        raise ValueError(f"world_size must be an int >= 2 or a non-empty sequence of them, got {world_size!r}")
    sizes = [int(n) for n in sizes]
    if min(sizes) < 2:
        raise ValueError(f"world_size must be >= 2 (at world size 1 no token is quantized; nothing to train), "
                         f"got {world_size!r}")
    return sizes


def _check_data(data, fam, world_size: int, cls: bool, steps: Optional[int]) -> List[Dict[str, Any]]:
    """``data`` as a list of batches, each checked as a forward at ``world_size`` ranks checks its inputs (before any
    training: a bad batch found at step k lost the k steps before it). An iterator or generator (no ``len``) is read
    for at most ``steps`` batches (a stream, or an endless one), else to its end."""
    data = batches(data, "data")
    data = list(data if isinstance(data, Sized) or steps is None else itertools.islice(data, steps))
    if not data:
        raise ValueError("finetune needs data: got an empty collection of batches")
    return [checked_batch(fam, b, "data", i, world_size, cls) for i, b in enumerate(data)]


def _check_numbers(**values) -> None:
    """The learning rates (``lr`` None: relative), ``beta``, ``naq`` and ``clip`` (0: off): finite numbers, the
    rates > 0 and the others >= 0 (a negative rate or clip trained the wrong way without an error)."""
    for name, v in values.items():
        if name == "lr" and v is None:
            continue
        if not is_finite_real(v, positive=name.endswith("lr")):
            raise ValueError(f"{name} must be a finite number {'> 0' if name.endswith('lr') else '>= 0'}, got {v!r}")


def _to(batch: Dict[str, Any], device) -> Dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@dataclass
class _Setup:
    params: List[torch.nn.Parameter]           # codebook parameters, one per layer
    teacher: Optional[torch.nn.Module]         # frozen copy (train="all"), None = the model itself
    optimizer: torch.optim.Optimizer


def codebook_lrs(cb: Codebooks, lr: Optional[float]) -> List[float]:
    """Every layer's codebook learning rate: ``lr``, or with None :data:`LR_RELATIVE` times the layer's mean
    absolute codebook entry."""
    if lr is None:
        return [LR_RELATIVE * float(t.detach().abs().mean()) for t in cb.tensors]
    if not is_finite_real(lr, positive=True):
        raise ValueError(f"lr must be a finite number > 0 (or None: relative to the codebooks' scale), got {lr}")
    return [float(lr)] * cb.num_layers


def _setup(model, cb: Codebooks, train: str, lr: Optional[float], model_lr: float) -> _Setup:
    dev = next(model.parameters()).device
    params = [torch.nn.Parameter(t.detach().to(device=dev, dtype=torch.float32).clone()) for t in cb.tensors]
    groups = [{"params": [p], "lr": r} for p, r in zip(params, codebook_lrs(cb, lr))]
    teacher = None
    if train == "all":      # the parameters the caller left trainable (a frozen embedding or base stays as it is)
        trainable = [p for p in model.parameters() if p.requires_grad]
        if not trainable:
            raise ValueError("train='all' trains the model's parameters, and every one has requires_grad=False: "
                             "unfreeze those to train, or give train='codebooks'")
        teacher = copy.deepcopy(model).eval().requires_grad_(False)
        groups.append({"params": trainable, "lr": model_lr})
    else:
        model.requires_grad_(False)
    return _Setup(params, teacher, torch.optim.Adam(groups))


def _reference(rt: TrainSimRuntime, teacher, batch):
    with torch.no_grad():
        if teacher is not None:
            return teacher(**batch)
        with rt.original_attention():
            return rt.model(**batch)


def _step(model, st: _Setup, cb: Codebooks, batch, n: int, opts: Dict[str, Any], gen) -> float:
    cbs = cb.with_tensors(st.params)
    rt = TrainSimRuntime(model, cbs, n, opts["class_token"], naq=opts["naq"], generator=gen)
    rt.install()
    try:
        ref = _reference(rt, st.teacher, batch)
        out, _ = rt.run(batch)
        task = opts["loss"](out, ref, batch)
        if not isinstance(task, torch.Tensor) or task.numel() != 1 or not task.is_floating_point():
            raise ValueError(f"astra.finetune: loss(out, ref, batch) must return a scalar float tensor, got "
                             f"{type(task).__name__} {tuple(getattr(task, 'shape', ()))}")
        task = task.reshape(())
        commit = torch.stack(rt.commitment).mean() if rt.commitment else task.new_zeros(())
    finally:
        rt.uninstall()
    loss = task + opts["beta"] * commit
    if not bool(torch.isfinite(loss)):
        raise FloatingPointError(
            f"astra.finetune: loss is {float(loss.detach())} (task {float(task.detach())}, commitment "
            f"{float(commit.detach())}) at world size "
            f"{n}; check the inputs and lower the learning rate")
    st.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if opts["clip"]:
        torch.nn.utils.clip_grad_norm_([p for g in st.optimizer.param_groups for p in g["params"]], opts["clip"])
    st.optimizer.step()
    return float(loss.detach())


def finetune(model, codebooks, data: Union[Dict[str, Any], Sequence[Dict[str, Any]]], *,
             world_size: Union[int, Sequence[int]], train: str = "codebooks", epochs: int = 1,
             steps: Optional[int] = None, lr: Optional[float] = None, model_lr: float = 2e-5, beta: float = 1e-4,
             naq: Optional[float] = None, class_token="auto", loss: Optional[Callable] = None, clip: float = 1.0,
             seed: int = 0, progress: bool = True, output_dir: Optional[str] = None) -> FinetuneResult:
    """Fine-tune ``codebooks`` (``train="codebooks"``, model weights untouched) or model and codebooks together
    (``train="all"``) on ``data``, a sequence of input dicts for ``model(**batch)`` (labels are not needed).

    ``world_size``: an int, or a sequence sampled (seeded) per step, so one set of codebooks serves several.
    ``loss(out, ref, batch)``: task loss of the simulated output ``out`` vs the unmodified model's ``ref``
    (default :func:`distill_loss`). ``naq``: lambda of noise-augmented quantization (training only; 0 = off;
    default :data:`NAQ_DEFAULT`: 0 for ``train="codebooks"``, 1 for ``train="all"``).
    ``lr``: the codebooks' learning rate; None: per layer :data:`LR_RELATIVE` times its mean absolute entry
    (:func:`codebook_lrs`). ``model_lr``: the model's, with ``train="all"``.
    ``steps`` defaults to ``epochs * len(data)``; batches are visited in a seeded shuffled order. ``data`` may
    also be an iterator or generator: with ``steps`` its first ``steps`` batches are read (an endless stream
    works), else all of them.
    ``output_dir``: writes ``codebooks.safetensors`` and, with ``train="all"``, the HF model (``save_pretrained``).
    The model runs in eval mode (no dropout). Deterministic on CPU for a given ``seed``.
    """
    if train not in TRAIN_MODES:
        raise ValueError(f"train must be one of {TRAIN_MODES}, got {train!r}")
    sizes = _world_sizes(world_size)
    fam = family_of(model)
    for name, v in (("steps", steps), ("epochs", epochs)):
        if v is not None and not is_count(v, 1):
            raise ValueError(f"nothing to train: {name} must be an int >= 1, got {v!r}")
    data = _check_data(data, fam, max(sizes), training_class_token(fam, class_token), steps)
    cb = as_codebooks(codebooks, model)
    if cb is None:
        raise ValueError("finetune needs codebooks (e.g. from astra.calibrate)")
    naq = NAQ_DEFAULT[train] if naq is None else naq
    _check_numbers(lr=lr, model_lr=model_lr, beta=beta, naq=naq, clip=clip)
    if not is_count(seed, 0):
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    if loss is not None and not callable(loss):
        raise TypeError(f"loss must be a callable loss(out, ref, batch) or None, got {type(loss).__name__}")
    total = steps if steps is not None else epochs * len(data)
    if output_dir is not None:
        _writable_dir(output_dir)
    opts = dict(class_token=class_token, naq=float(naq), loss=loss or distill_loss, beta=float(beta),
                clip=float(clip))
    if train == "all":      # the weights move: the codebooks' sample of them would refuse the model after a step
        cb = cb.with_tensors(cb.tensors)
        cb.weights_sample = None
    res = FinetuneResult(codebooks=cb, model=model)
    frozen = {p: (p.requires_grad, p.grad) for p in model.parameters()}
    try:                    # the setup too: a model that cannot be copied failed with its mode and flags changed
        with eval_mode(model):
            st = _setup(model, cb, train, lr, model_lr)
            _train(model, st, cb, data, sizes, total, opts, seed, desc=f"astra.finetune[{fam.name}, {train}]",
                   progress=progress, res=res)
    finally:
        for p, (requires_grad, grad) in frozen.items():   # gradients as they were: the steps' are a model-sized
            p.requires_grad_(requires_grad)                   # copy the caller never asked for
            p.grad = grad
    res.codebooks = cb.with_tensors([p.detach().to(cb.dtype) for p in st.params])
    if train == "all":
        res.codebooks.weights_sample = weights_sample(model)
    if output_dir is not None:
        res.output_dir = save_finetuned(res, output_dir, save_model=(train == "all"))
    return res


def _train(model, st: _Setup, cb: Codebooks, data: List[Dict[str, Any]], sizes: List[int], total: int,
           opts: Dict[str, Any], seed: int, *, desc: str, progress: bool, res: FinetuneResult) -> None:
    """``total`` steps over ``data`` in a seeded shuffled order, each at a world size picked (seeded) from ``sizes``;
    appends every step's loss and world size to ``res``."""
    from tqdm.auto import tqdm

    dev = st.params[0].device
    gen = torch.Generator(device=dev).manual_seed(seed)
    order_gen = torch.Generator().manual_seed(seed)
    pick = random.Random(seed)
    order: List[int] = []
    with tqdm(total=total, desc=desc, disable=not progress) as bar:
        for _ in range(total):
            if not order:
                order = torch.randperm(len(data), generator=order_gen).tolist()
            n = sizes[0] if len(sizes) == 1 else pick.choice(sizes)
            res.losses.append(_step(model, st, cb, _to(data[order.pop(0)], dev), n, opts, gen))
            res.world_sizes.append(n)
            bar.update(1)
            bar.set_postfix(loss=f"{sum(res.losses[-20:]) / len(res.losses[-20:]):.4g}", ws=n)


def _writable_dir(path: str) -> None:
    """Make ``path`` (a directory) now, or ValueError: before the training, whose result a bad ``output_dir`` lost."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise ValueError(f"output_dir {path!r} cannot be made ({e.strerror})") from e
    if not os.access(path, os.W_OK):
        raise ValueError(f"output_dir {path!r} is not writable")


def save_finetuned(res: FinetuneResult, output_dir: str, *, save_model: bool) -> str:
    """Write ``codebooks.safetensors`` (and the HF model with ``save_model``) into ``output_dir``."""
    os.makedirs(output_dir, exist_ok=True)
    if save_model:
        res.model.save_pretrained(output_dir)
    res.codebooks.save(os.path.join(output_dir, CODEBOOKS_FILE))
    return output_dir
