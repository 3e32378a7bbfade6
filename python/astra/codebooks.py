"""Per-layer VQ codebooks: one ``[G, K, D/G]`` tensor per layer plus metadata, stored as safetensors.

Optionally each layer also has a transform ``T [D, D]`` (invertible) and its inverse: a hidden state ``h`` is
then quantized as ``y = h @ T`` cut into the G groups, and dequantized as ``y_hat @ T^-1``. :func:`astra.calibrate`
makes it with :mod:`astra.bases`: the attention basis, in which the squared quantization error is the error it
causes in the attention output, rotated so that every group gets a share of the variance.

Optionally each layer also has a predictor (:attr:`Codebooks.predictive`): a weight ``P [2D, D]`` and a bias
``p [D]``. Layer l then quantizes not ``h`` but its residual ``h - ([e, h_prev] @ P + p)``, where ``e`` is the
token's embedding output (every rank embeds the whole sequence: an encoder's ``embeddings`` module, a decoder's
:meth:`astra.models.Family.embed`; zero only for a family whose adapter gives neither) and ``h_prev`` its dequantized
hidden state of layer l - 1 (zero for layer 0). Every rank holds both for every token it receives,
so the prediction costs no bits: the codes carry only what it misses (closed-loop predictive coding, as in DPCM).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import warnings
from typing import List, Optional, Sequence

import torch

from astra_kernels import MAX_K, default_bits
from astra_kernels.checks import FLOAT_DTYPES, check_finite, is_count
from .weights_sample import check_text, mismatch

FORMAT = "astra-codebooks"
FORMAT_VERSION = "2"            # 2: metadata carries sha256 checksums of every layer and of the metadata
ROTATED_VERSION = "3"           # 3 (read only): version 2 plus one orthogonal rotation per layer (rotation.<i>)
TRANSFORMED_VERSION = "4"       # 4: version 2 plus per layer a transform and its inverse (transform.<i>, inverse.<i>)
PREDICTIVE_VERSION = "5"        # 5: version 2 or 4 plus per layer a predictor (predictor.<i>, predictor_bias.<i>);
#                                 its metadata names the tensor kinds it holds ("kinds")
PLACEHOLDER_VERSION = "6"       # 6: version 2, 4 or 5 whose metadata also names placeholder layers
#                                 ("placeholder_layers") and the tensor kinds it holds ("kinds")
UNCHECKED_VERSION = "1"         # written before checksums: loads with a warning


class Codebooks:
    """One ``[G, K, D/G]`` codebook per Transformer layer.

    ``model_type`` is the HF ``config.model_type`` of the model family the codebooks were built for
    (a registered family's name, e.g. ``"gpt2"``, ``"qwen3"``, ``"bert"``), ``hidden_size`` its D.
    ``transforms``: None, or one invertible ``[D, D]`` float tensor per layer (see the module docstring);
    ``inverses``: their inverses (None: computed in float64). Every pair must multiply to the identity.
    ``predictors`` / ``predictor_biases``: None, or one ``[2D, D]`` weight and one ``[D]`` bias per layer (see the
    module docstring; both or neither).
    ``placeholder_layers``: layers whose tensors are placeholders that no runtime reads (zero codebook, identity
    transform, zero predictor): layers whose inputs every rank computes itself (:meth:`astra.models.Family.exchanged`
    is False for them), which :func:`astra.calibrate` therefore does not fit. :meth:`check_model` refuses these
    codebooks for a model whose family exchanges such a layer.
    ``weights_sample``: None, or a sample of the weights of the checkpoint they were made for
    (:mod:`astra.weights_sample`; :func:`astra.calibrate` takes it): :meth:`check_model` then refuses a model with other
    weights. To use the codebooks with other weights on purpose, set it to None.
    """

    def __init__(self, tensors: Sequence[torch.Tensor], *, model_type: str, hidden_size: int,
                 transforms: Optional[Sequence[torch.Tensor]] = None,
                 inverses: Optional[Sequence[torch.Tensor]] = None,
                 predictors: Optional[Sequence[torch.Tensor]] = None,
                 predictor_biases: Optional[Sequence[torch.Tensor]] = None,
                 placeholder_layers: Sequence[int] = (), weights_sample: Optional[str] = None):
        tensors = list(tensors)
        if not tensors:
            raise ValueError("Codebooks needs at least one layer")
        if not isinstance(model_type, str) or not model_type:
            raise ValueError(f"model_type must be a non-empty string, got {model_type!r}")
        if not is_count(hidden_size, 1):
            raise ValueError(f"hidden_size must be an int >= 1, got {hidden_size!r}")
        hidden_size = int(hidden_size)
        first = tensors[0]
        for i, t in enumerate(tensors):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"codebook of layer {i} is not a tensor ({type(t).__name__})")
            if t.dtype not in FLOAT_DTYPES:
                raise ValueError(f"codebook of layer {i} has dtype {t.dtype}; expected a floating dtype")
            if t.ndim != 3:
                raise ValueError(f"codebook of layer {i} has shape {tuple(t.shape)}; expected [G, K, D/G]")
            if t.shape != first.shape or t.dtype != first.dtype:
                raise ValueError(
                    f"codebook of layer {i} is {tuple(t.shape)} {t.dtype}, "
                    f"layer 0 is {tuple(first.shape)} {first.dtype}; all layers must share shape and dtype"
                )
            check_finite(f"codebook of layer {i}", t)
        tensors = [as_normal_tensor(t) for t in tensors]
        G, K, d = first.shape
        if G < 1 or K < 1 or d < 1:
            raise ValueError(f"codebook shape {tuple(first.shape)} has an empty dimension")
        if G * d != hidden_size:
            raise ValueError(f"codebooks are [G={G}, K={K}, D/G={d}] but hidden_size is {hidden_size} (G*D/G={G * d})")
        if K > MAX_K:
            raise ValueError(f"codebook size K={K} needs more than 16 bits per code (wire format limit: K <= {MAX_K})")
        self.tensors: List[torch.Tensor] = tensors
        self.model_type = model_type
        self.hidden_size = hidden_size
        self.transforms: Optional[List[torch.Tensor]]
        self.inverses: Optional[List[torch.Tensor]]
        self.transforms, self.inverses = _checked_transforms(transforms, inverses, len(tensors), hidden_size)
        self.predictors: Optional[List[torch.Tensor]]
        self.predictor_biases: Optional[List[torch.Tensor]]
        self.predictors, self.predictor_biases = _checked_predictors(predictors, predictor_biases, len(tensors),
                                                                     hidden_size)
        self.placeholder_layers = _checked_layers(placeholder_layers, len(tensors))
        self.weights_sample = weights_sample

    @property
    def weights_sample(self) -> Optional[str]:
        """The sample of the weights these codebooks were made for (:mod:`astra.weights_sample`), or None."""
        return self._weights_sample

    @weights_sample.setter
    def weights_sample(self, text: Optional[str]) -> None:
        if text is not None:
            check_text(text)
        self._weights_sample = text

    def with_tensors(self, tensors: Sequence[torch.Tensor]) -> "Codebooks":
        """The same codebooks (family, size, transforms) with other per-layer tensors. The transforms are shared,
        not checked again (fine-tuning calls this every step; their check is a D^3 product)."""
        out = Codebooks(tensors, model_type=self.model_type, hidden_size=self.hidden_size)
        if (self.transformed or self.predictive) and out.num_layers != self.num_layers:
            what = "transforms" if self.transformed else "predictors"
            raise ValueError(f"{out.num_layers} codebook layers for {self.num_layers} {what}; give one per layer")
        out.transforms, out.inverses = self.transforms, self.inverses
        out.predictors, out.predictor_biases = self.predictors, self.predictor_biases
        out.placeholder_layers = _checked_layers(self.placeholder_layers, out.num_layers)
        out.weights_sample = self.weights_sample
        return out

    # -- shape metadata ----------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.tensors)

    @property
    def groups(self) -> int:
        return int(self.tensors[0].shape[0])

    @property
    def codebook_size(self) -> int:
        return int(self.tensors[0].shape[1])

    @property
    def bits(self) -> int:
        return default_bits(self.codebook_size)

    @property
    def dtype(self) -> torch.dtype:
        return self.tensors[0].dtype

    def __len__(self) -> int:
        return len(self.tensors)

    def __getitem__(self, layer: int) -> torch.Tensor:
        return self.tensors[layer]

    def __iter__(self):
        return iter(self.tensors)

    def __repr__(self) -> str:
        return (
            f"Codebooks(model_type={self.model_type!r}, layers={self.num_layers}, hidden_size={self.hidden_size}, "
            f"G={self.groups}, K={self.codebook_size}, bits={self.bits}, dtype={self.dtype}"
            f"{', transformed' if self.transformed else ''}{', predictive' if self.predictive else ''}"
            f"{f', placeholder_layers={list(self.placeholder_layers)}' if self.placeholder_layers else ''})"
        )

    @property
    def transformed(self) -> bool:
        return self.transforms is not None

    @property
    def predictive(self) -> bool:
        """Each layer quantizes the residual of a prediction (see the module docstring)."""
        return self.predictors is not None

    def to(self, *args, **kwargs) -> "Codebooks":
        """These codebooks with every tensor moved / cast by ``Tensor.to(*args, **kwargs)``. ValueError where a cast
        overflows the new dtype. The transforms keep the check they passed (a cast only rounds them: a bf16 pair
        cast to float32 keeps its bf16 product's error)."""
        def moved(what, ts):
            return None if ts is None else cast_layers(what, ts, *args, **kwargs)
        out = self.with_tensors(moved("codebook", self.tensors))
        out.transforms, out.inverses = moved("transform", self.transforms), moved("inverse", self.inverses)
        out.predictors = moved("predictor", self.predictors)
        out.predictor_biases = moved("predictor bias", self.predictor_biases)
        return out

    def bits_per_token(self) -> int:
        return self.groups * self.bits

    # -- model check -----------------------------------------------------------------------------
    def check_model(self, model) -> None:
        """Raise ValueError unless these codebooks fit ``model`` (family, hidden size, layer count, and the weights they
        were made for where they keep a sample of them)."""
        from .models import check_has_weights, family_of

        fam = family_of(model)
        check_has_weights(model)
        if fam.name != self.model_type:
            raise ValueError(f"codebooks were built for model_type {self.model_type!r}, model is {fam.name!r}")
        if fam.hidden_size != self.hidden_size:
            raise ValueError(f"codebooks have hidden_size {self.hidden_size}, model has {fam.hidden_size}")
        if fam.num_layers != self.num_layers:
            raise ValueError(f"codebooks have {self.num_layers} layers, model has {fam.num_layers}")
        exchanged = [l for l in self.placeholder_layers if fam.exchanged(l)]
        if exchanged:
            raise ValueError(f"codebooks hold only placeholders for layer(s) {exchanged}, which every rank computed "
                             f"itself where they were calibrated, but {fam.name} exchanges them here: re-calibrate")
        why = None if self.weights_sample is None else mismatch(self.weights_sample, model)
        if why is not None:
            raise ValueError(f"codebooks were made for other weights than this model's: {why}. Calibrate them for "
                             "this checkpoint (astra.calibrate), or, to use them anyway, set codebooks.weights_sample "
                             "= None")

    # -- integrity -------------------------------------------------------------------------------
    def layer_checksums(self) -> List[str]:
        """sha256 of each layer's dtype, shape and bytes."""
        return [tensor_checksum(t) for t in self.tensors]

    def all_tensors(self) -> List[torch.Tensor]:
        """Every tensor these codebooks hold: the codebooks, then the transforms, inverses and predictors."""
        return [*self.tensors, *(t for ts in self._extra().values() for t in ts)]

    def _extra(self) -> dict:
        """The per-layer tensors besides the codebooks, by kind (the file's ``<kind>.<i>``)."""
        kinds = {"transform": self.transforms, "inverse": self.inverses, "predictor": self.predictors,
                 "predictor_bias": self.predictor_biases}
        return {k: ts for k, ts in kinds.items() if ts is not None}

    def _metadata(self) -> dict:
        version = (PLACEHOLDER_VERSION if self.placeholder_layers else PREDICTIVE_VERSION if self.predictive
                   else TRANSFORMED_VERSION if self.transformed else FORMAT_VERSION)
        meta = {"format": FORMAT, "version": version,
                "model_type": self.model_type, "hidden_size": str(self.hidden_size), "num_layers": str(self.num_layers),
                "groups": str(self.groups), "codebook_size": str(self.codebook_size),
                "layer_checksums": ",".join(self.layer_checksums())}
        for kind, ts in self._extra().items():
            meta[f"{kind}_checksums"] = ",".join(tensor_checksum(t) for t in ts)
        if version in (PREDICTIVE_VERSION, PLACEHOLDER_VERSION):
            meta["kinds"] = ",".join(["layer", *self._extra()])
        if self.placeholder_layers:
            meta["placeholder_layers"] = ",".join(map(str, self.placeholder_layers))
        if self.weights_sample is not None:
            meta["weights_sample"] = self.weights_sample
        return meta

    def checksum(self) -> str:
        """sha256 of the metadata and every layer's checksum: the identity of these codebooks."""
        return metadata_checksum(self._metadata())

    # -- persistence -----------------------------------------------------------------------------
    def save(self, path: "str | os.PathLike") -> None:
        """Write a safetensors file at ``path`` (its directory must exist). An existing file is replaced whole (a new
        file, with the permissions a new file gets, renamed over it: a reader never sees half of one); through a
        symbolic link, the link's target is. Anything but a regular file there (a device, a FIFO) is refused."""
        from safetensors.torch import save as serialized

        path = os.fsdecode(os.fspath(path))         # bytes too, as load takes them
        if not path:
            raise ValueError("cannot save codebooks to an empty path")
        folder = os.path.dirname(os.path.abspath(path))
        if os.path.isdir(path):
            raise IsADirectoryError(f"{path} is a directory; give the codebook file's path")
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"cannot save codebooks to {path}: no directory {folder}")
        if os.path.exists(path) and not os.path.isfile(path):     # (safetensors' save_file replaced /dev/null)
            raise ValueError(f"cannot save codebooks to {path}: it is not a regular file (a device, a FIFO or a "
                             "socket); give a file's path")
        # contiguous copies: safetensors refuses tensors that share memory (a placeholder layer's transform and
        # inverse are one identity; float64 codebooks keep it without a copy) and non-contiguous ones (a PCA basis's
        # inverse is its transform's transposed view)
        own = lambda t: t.detach().cpu().clone(memory_format=torch.contiguous_format)  # noqa: E731
        tensors = {f"layer.{i}": own(t) for i, t in enumerate(self.tensors)}
        for kind, ts in self._extra().items():
            for i, t in enumerate(ts):
                tensors[f"{kind}.{i}"] = own(t)
        meta = self._metadata()
        meta["checksum"] = metadata_checksum(meta)
        replace_file(os.path.realpath(path), serialized(tensors, metadata=meta))

    @classmethod
    def load(cls, path: "str | os.PathLike", model=None, *, device="cpu") -> "Codebooks":
        """Load codebooks saved by :meth:`save`, verifying the checksums (a corrupt layer is named); with
        ``model``, also check they fit it. Version-1 files (no checksums) load with a warning; version-3 files
        (orthogonal rotations) load with each rotation's transpose as its inverse."""
        from safetensors import safe_open

        path = os.fsdecode(os.fspath(path))
        try:
            device = torch.device(device)
        except (TypeError, RuntimeError) as e:
            raise ValueError(f"device must be 'cpu' or a CUDA device, got {device!r}") from e
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or a CUDA device, got {str(device)!r}")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={str(device)!r}: this torch has no CUDA device (torch {torch.__version__})")
        if os.path.isdir(path):
            raise IsADirectoryError(f"{path} is a directory: give the codebooks file in it")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no codebook file at {path}")
        _check_header_size(path)
        try:
            f = safe_open(path, framework="pt", device="cpu")
        except Exception as e:  # safetensors raises its own error types for malformed files
            raise ValueError(f"{path} is not a valid safetensors file: {e}") from e
        with f:
            meta = f.metadata() or {}
            n, hidden, G, K, model_type = _check_metadata(path, meta)
            kinds = _tensor_kinds(path, meta)
            keys = set(f.keys())
            if not 1 <= n * len(kinds) == len(keys) or keys != {f"{kind}.{i}" for i in range(n) for kind in kinds}:
                names = " and ".join(f"{k}.0..{k}.{n - 1}" for k in kinds)
                raise ValueError(f"{path}: expected tensors {names}, found {sorted(keys)}")
            _check_declared(path, f, kinds, n, (hidden, G, K))
            read = {kind: [f.get_tensor(f"{kind}.{i}") for i in range(n)] for kind in kinds}
        for kind in kinds:
            if meta["version"] != UNCHECKED_VERSION:
                _verify(path, kind, read[kind], meta.get(f"{kind}_checksums", ""))
            read[kind] = [t.to(device) for t in read[kind]]
        if "rotation" in read:
            read["transform"], read["inverse"] = read["rotation"], [r.t().contiguous() for r in read["rotation"]]
        tensors = read["layer"]
        placeholders, sample = _placeholder_layers(path, meta), _weights_sample(path, meta)
        with _named_file(path):     # what the constructor or the model check refuses, named with the file
            cb = cls(tensors, model_type=model_type, hidden_size=hidden, transforms=read.get("transform"),
                     inverses=read.get("inverse"), predictors=read.get("predictor"),
                     predictor_biases=read.get("predictor_bias"), placeholder_layers=placeholders,
                     weights_sample=sample)
            if cb.groups != G or cb.codebook_size != K:
                raise ValueError(f"metadata says G={G}, K={K} but tensors are {tuple(tensors[0].shape)}")
            if model is not None:
                cb.check_model(model)
        return cb

    @classmethod
    def random(cls, model, *, groups: int, codebook_size: int, seed: int = 0, scale: float = 1.0) -> "Codebooks":
        """Gaussian random codebooks (for tests; use :func:`astra.calibrate` for useful ones)."""
        from .models import family_of

        fam = family_of(model)
        D = fam.hidden_size
        if not is_count(groups, 1) or D % groups:
            raise ValueError(f"hidden size {D} is not divisible by G={groups}")
        if not is_count(codebook_size, 1):
            raise ValueError(f"codebook_size must be an int >= 1, got {codebook_size!r}")
        if not is_count(seed, 0):
            raise ValueError(f"seed must be an int >= 0, got {seed!r}")
        g = torch.Generator().manual_seed(seed)
        t = [torch.randn(groups, codebook_size, D // groups, generator=g) * scale for _ in range(fam.num_layers)]
        return cls(t, model_type=fam.name, hidden_size=D)


def _verify(path: str, kind: str, tensors: Sequence[torch.Tensor], sums_text: str) -> None:
    sums = sums_text.split(",")
    for i, t in enumerate(tensors):
        if i >= len(sums) or tensor_checksum(t) != sums[i]:
            raise ValueError(f"{path}: {kind} {i} fails its checksum: the file is corrupt (re-calibrate or restore it)")


#: the tensors each format version holds per layer (versions not listed: the codebooks only; versions 5 and 6 name
#: them)
_TENSOR_KINDS = {ROTATED_VERSION: ("layer", "rotation"), TRANSFORMED_VERSION: ("layer", "transform", "inverse")}
#: the kinds a file of each version that names them (metadata "kinds") may name
_NAMED_KINDS = {PREDICTIVE_VERSION: (("layer", "predictor", "predictor_bias"),
                                     ("layer", "transform", "inverse", "predictor", "predictor_bias"))}
_NAMED_KINDS[PLACEHOLDER_VERSION] = (("layer",), ("layer", "transform", "inverse"), *_NAMED_KINDS[PREDICTIVE_VERSION])


#: the tensor dtypes a codebook file may hold (safetensors' names)
_FILE_DTYPES = ("F16", "BF16", "F32", "F64")


def replace_file(path: str, data: bytes) -> None:
    """``data`` as the file ``path``: written to a new file beside it (created as any new file is, under the umask)
    and renamed over it."""
    tmp = os.path.join(os.path.dirname(path), f".astra-{os.getpid()}-{secrets.token_hex(4)}.tmp")   # any name length
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def _check_declared(path: str, f, kinds: tuple, n: int, sizes: tuple) -> None:
    """Every tensor's dtype and shape as the file's header declares them, before any is read: a tensor of another
    shape than the metadata's ``(hidden, G, K)`` give (a file declaring gigabytes), or of a dtype torch can not read,
    is refused without reading it (ValueError naming the tensor)."""
    hidden, G, K = sizes
    want = {"layer": [G, K, hidden // G if G > 0 else -1], "predictor": [2 * hidden, hidden],
            "predictor_bias": [hidden]}
    for kind in kinds:
        for i in range(n):
            name = f"{kind}.{i}"
            try:
                sl = f.get_slice(name)
                shape, dtype = list(sl.get_shape()), str(sl.get_dtype())
            except Exception as e:  # safetensors' own error types (a dtype it does not know)
                raise ValueError(f"{path}: tensor {name} can not be read ({e}): the file is corrupt") from None
            expected = want.get(kind, [hidden, hidden])
            if dtype not in _FILE_DTYPES or shape != expected:
                raise ValueError(f"{path}: tensor {name} is declared {dtype} {shape}; expected one of "
                                 f"{'/'.join(_FILE_DTYPES)} {expected} (the metadata's sizes): the file is corrupt")


def _tensor_kinds(path: str, meta: dict) -> tuple:
    version = meta["version"]
    if version not in _NAMED_KINDS:
        return _TENSOR_KINDS.get(version, ("layer",))
    kinds = tuple(meta.get("kinds", "").split(","))
    if kinds not in _NAMED_KINDS[version]:
        raise ValueError(f"{path}: codebook file version {version} names tensor kinds {meta.get('kinds')!r}; expected "
                         f"one of {[','.join(k) for k in _NAMED_KINDS[version]]}: the file is corrupt")
    return kinds


def _placeholder_layers(path: str, meta: dict) -> tuple:
    """The placeholder layers a version-6 file names (other versions: none)."""
    if meta["version"] != PLACEHOLDER_VERSION:
        return ()
    try:
        return tuple(int(x) for x in meta.get("placeholder_layers", "").split(","))
    except ValueError:
        raise ValueError(f"{path}: codebook file version 6 names placeholder layers "
                         f"{meta.get('placeholder_layers')!r}; expected layer numbers: the file is corrupt") from None


def _weights_sample(path: str, meta: dict) -> Optional[str]:
    text = meta.get("weights_sample")
    try:
        if text is not None:
            check_text(text)
    except ValueError:
        raise ValueError(f"{path}: its weights sample is not readable: the file is corrupt") from None
    return text


def cast_checked(t: torch.Tensor, what: str, *args, **kwargs) -> torch.Tensor:
    """``t.to(*args, **kwargs)``; ValueError naming ``what`` where the cast turns a finite entry into an infinite one
    (a half-precision model: fp16 holds 65504, and a rotated basis' coordinates reach the hidden states' norm)."""
    out = t.to(*args, **kwargs)
    if out.dtype != t.dtype and out.is_floating_point() and not bool(torch.isfinite(out).all()) \
            and bool(torch.isfinite(t).all()):
        raise ValueError(f"{what}: entries up to {float(t.abs().max()):.4g} overflow {out.dtype}: run the model in "
                         "float32 (model.float()), or calibrate with basis='none'")
    return out


def cast_layers(what: str, tensors: Sequence[torch.Tensor], *args, **kwargs) -> List[torch.Tensor]:
    """Each layer's tensor through :func:`cast_checked` (named ``"<what> of layer <i>"``)."""
    return [cast_checked(t, f"{what} of layer {i}", *args, **kwargs) for i, t in enumerate(tensors)]


def _checked_layers(layers: Sequence[int], count: int) -> tuple:
    """``layers`` as a sorted tuple of distinct layer numbers in ``[0, count)``, not all of them, else ValueError."""
    layers = list(layers)
    if not all(is_count(l) for l in layers):
        raise ValueError(f"placeholder layers must be layer numbers (ints), got {layers!r}")
    out = tuple(sorted({int(l) for l in layers}))
    if out and not (0 <= out[0] and out[-1] < count):
        raise ValueError(f"placeholder layers {list(out)} are not all in 0..{count - 1}")
    if len(out) == count:
        raise ValueError("every layer is a placeholder: there is nothing to quantize with")
    return out

#: how far ``T @ T^-1`` may be from the identity (float64 product of the stored tensors, largest entry): 1e-3, and
#: 0.1 for tensors rounded to 16 bits
INVERSE_TOL = 1e-3
INVERSE_TOL_16BIT = 0.1


def _checked_tensor(what: str, t, shape: tuple) -> torch.Tensor:
    """``t`` if it is a finite floating tensor of ``shape``, else ValueError naming ``what``."""
    if not isinstance(t, torch.Tensor) or t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{what} must be a floating tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{what} has shape {tuple(t.shape)}; expected {list(shape)}")
    check_finite(what, t)
    return as_normal_tensor(t)      # calibrated under inference_mode: fine-tuning saves them for backward


def _inverse(what: str, t: torch.Tensor) -> torch.Tensor:
    try:
        return torch.linalg.inv(t.detach().double()).to(t.dtype)
    except RuntimeError as e:  # torch.linalg.LinAlgError
        raise ValueError(f"{what} is singular: it has no inverse") from e


def _checked_transforms(transforms, inverses, layers: int, hidden_size: int):
    """``(transforms, inverses)`` checked (count, shape, dtype, finite, each pair's product the identity), the
    inverses computed in float64 where not given."""
    if transforms is None:
        if inverses is not None:
            raise ValueError("inverses were given without transforms")
        return None, None
    transforms = list(transforms)
    if len(transforms) != layers:
        raise ValueError(f"{len(transforms)} transforms for {layers} codebook layers; give one per layer")
    square = (hidden_size, hidden_size)
    transforms = [_checked_tensor(f"transform of layer {i}", t, square) for i, t in enumerate(transforms)]
    if inverses is None:
        inverses = [_inverse(f"transform of layer {i}", t) for i, t in enumerate(transforms)]
    inverses = list(inverses)
    if len(inverses) != layers:
        raise ValueError(f"{len(inverses)} inverses for {layers} transforms; give one per layer")
    inverses = [_checked_tensor(f"inverse transform of layer {i}", inv, square) for i, inv in enumerate(inverses)]
    eye = torch.eye(hidden_size, dtype=torch.float64)
    for i, (t, inv) in enumerate(zip(transforms, inverses)):
        off = float((t.detach().double().cpu() @ inv.detach().double().cpu() - eye).abs().max())
        sixteen = torch.float16 in (t.dtype, inv.dtype) or torch.bfloat16 in (t.dtype, inv.dtype)
        if not off <= (INVERSE_TOL_16BIT if sixteen else INVERSE_TOL):
            raise ValueError(f"transform of layer {i} and its inverse do not multiply to the identity (max |T T^-1 - I|"
                             f" = {off:.2e}): the transform is singular or ill-conditioned, or the inverse is wrong")
    return transforms, inverses


def _checked_predictors(weights, biases, layers: int, hidden_size: int):
    """``(weights, biases)`` checked: both or neither, one per layer, ``[2D, D]`` and ``[D]`` floating and finite."""
    if weights is None and biases is None:
        return None, None
    if weights is None or biases is None:
        raise ValueError("predictors and predictor_biases go together: give both or neither")
    weights, biases = list(weights), list(biases)
    for what, whats, ts, shape in (("predictor", "predictors", weights, (2 * hidden_size, hidden_size)),
                                   ("predictor bias", "predictor biases", biases, (hidden_size,))):
        if len(ts) != layers:
            raise ValueError(f"{len(ts)} {whats} for {layers} codebook layers; give one per layer")
        ts[:] = [_checked_tensor(f"{what} of layer {i}", t, shape) for i, t in enumerate(ts)]
    return weights, biases


def apply_predictor(w: torch.Tensor, b: torch.Tensor, emb: Optional[torch.Tensor], prev: Optional[torch.Tensor],
                    matmul=torch.matmul) -> torch.Tensor:
    """A predictive layer's prediction ``[emb, prev] @ w + b`` (``w [2D, D]``, ``b [D]``; ``emb`` / ``prev``
    ``[..., D]``, None: zero, so both None give ``b``), in ``w``'s dtype, the products by ``matmul``."""
    D = w.shape[1]
    out = b
    for x, part in ((emb, w[:D]), (prev, w[D:])):
        if x is not None:
            out = out + matmul(x.to(w.dtype), part)
    return out


def as_normal_tensor(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a normal copy of it if it is an inference tensor (made under ``torch.inference_mode``, e.g. codebooks
    calibrated there): an inference tensor cannot be saved for backward (fine-tuning) nor be updated in place
    outside inference mode."""
    if not t.is_inference():
        return t
    with torch.inference_mode(False):
        return t.clone()


def as_codebooks(codebooks, model) -> Optional[Codebooks]:
    if codebooks is None:
        return None
    if isinstance(codebooks, (str, os.PathLike)):
        return Codebooks.load(codebooks, model)
    if not isinstance(codebooks, Codebooks):
        raise TypeError(f"codebooks must be astra.Codebooks, a path, or None; got {type(codebooks).__name__}")
    codebooks.check_model(model)
    return codebooks


def tensor_checksum(t: torch.Tensor) -> str:
    t = t.detach().contiguous().cpu()
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))     # (no second copy of the tensor)
    return h.hexdigest()


def metadata_checksum(meta: dict) -> str:
    body = "\n".join(f"{k}={meta[k]}" for k in sorted(meta) if k != "checksum")
    return hashlib.sha256(body.encode()).hexdigest()


#: the largest safetensors header a codebook file may have (real ones: KB to tens of KB): safetensors itself parses
#: headers up to 100 MB, ~10x that in memory, before astra could read its metadata
MAX_HEADER_NBYTES = 16 << 20


@contextlib.contextmanager
def _named_file(path: str):
    """Re-raise a ValueError / TypeError from the block with ``path`` in front of its message."""
    try:
        yield
    except (TypeError, ValueError) as e:
        raise type(e)(f"{path}: {e}") from e


def _check_header_size(path: str) -> None:
    """A header the file holds but no codebook file needs (one longer than the file is safetensors' to refuse: it
    reads nothing past the end)."""
    with open(path, "rb") as fh:
        head = fh.read(8)
    n = int.from_bytes(head, "little") if len(head) == 8 else 0
    if MAX_HEADER_NBYTES < n <= os.path.getsize(path) - 8:
        raise ValueError(f"{path}: a header of {n} bytes is too large for a codebook file (at most "
                         f"{MAX_HEADER_NBYTES}): corrupt, or not a codebook file")


def _check_metadata(path: str, meta: dict):
    """Format, version and checksum of the metadata; its numbers (num_layers, hidden, G, K, model_type)."""
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not an astra codebook file (metadata format={meta.get('format')!r})")
    version = meta.get("version")
    if version in (FORMAT_VERSION, ROTATED_VERSION, TRANSFORMED_VERSION, PREDICTIVE_VERSION, PLACEHOLDER_VERSION):
        if "checksum" not in meta or "layer_checksums" not in meta:
            raise ValueError(f"{path}: codebook file version {version} without its checksums: the file is corrupt")
        if metadata_checksum(meta) != meta["checksum"]:
            raise ValueError(f"{path}: the metadata fails its checksum: the file is corrupt")
    elif version == UNCHECKED_VERSION:
        extra = set(meta) - {"format", "version", "model_type", "hidden_size", "num_layers", "groups", "codebook_size"}
        if extra:
            raise ValueError(f"{path}: codebook file version 1 with unexpected metadata {sorted(extra)}: corrupt")
        warnings.warn(f"{path}: codebook file version 1 has no checksums, so corruption can not be detected; "
                      "re-save it with Codebooks.save to add them", UserWarning, stacklevel=3)
    else:
        raise ValueError(f"{path}: unsupported codebook format version {version!r}")
    try:
        return (int(meta["num_layers"]), int(meta["hidden_size"]), int(meta["groups"]), int(meta["codebook_size"]),
                meta["model_type"])
    except (KeyError, ValueError) as e:
        raise ValueError(f"{path}: missing or malformed codebook metadata ({e})") from e
