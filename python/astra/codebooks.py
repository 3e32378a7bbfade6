"""Per-layer VQ codebooks: one ``[G, K, D/G]`` tensor per layer plus metadata, stored as safetensors.

Optionally each layer also has a rotation ``R [D, D]`` (orthogonal): a hidden state ``h`` is then quantized as
``y = h @ R`` cut into the G groups, and dequantized as ``y_hat @ R.T``. :func:`astra.calibrate` makes it from
the principal axes of the layer's hidden states, dealt out so that every group gets a share of the variance
(the initial rotation of optimized product quantization); G = 1 codebooks gain nothing from one.
"""
from __future__ import annotations

import hashlib
import os
import warnings
from typing import List, Optional, Sequence

import torch

from astra_kernels import MAX_K, default_bits
from astra_kernels.checks import FLOAT_DTYPES, check_finite

FORMAT = "astra-codebooks"
FORMAT_VERSION = "2"            # 2: metadata carries sha256 checksums of every layer and of the metadata
ROTATED_VERSION = "3"           # 3: version 2 plus one rotation per layer (tensors rotation.<i>, their checksums)
UNCHECKED_VERSION = "1"         # written before checksums: loads with a warning


class Codebooks:
    """One ``[G, K, D/G]`` codebook per Transformer layer.

    ``model_type`` is the HF ``config.model_type`` of the model family the codebooks were built for
    (a registered family's name, e.g. ``"gpt2"``, ``"qwen3"``, ``"bert"``), ``hidden_size`` its D.
    ``rotations``: None, or one orthogonal ``[D, D]`` float tensor per layer (see the module docstring).
    """

    def __init__(self, tensors: Sequence[torch.Tensor], *, model_type: str, hidden_size: int,
                 rotations: Optional[Sequence[torch.Tensor]] = None):
        tensors = list(tensors)
        if not tensors:
            raise ValueError("Codebooks needs at least one layer")
        if not isinstance(model_type, str) or not model_type:
            raise ValueError(f"model_type must be a non-empty string, got {model_type!r}")
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
        self.rotations: Optional[List[torch.Tensor]] = _checked_rotations(rotations, len(tensors), hidden_size)

    def with_tensors(self, tensors: Sequence[torch.Tensor]) -> "Codebooks":
        """The same codebooks (family, size, rotations) with other per-layer tensors. The rotations are shared,
        not checked again (fine-tuning calls this every step; their orthogonality check is a D^3 product)."""
        out = Codebooks(tensors, model_type=self.model_type, hidden_size=self.hidden_size)
        if self.rotated and out.num_layers != self.num_layers:
            raise ValueError(f"{out.num_layers} codebook layers for {self.num_layers} rotations; give one per layer")
        out.rotations = self.rotations
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
            f"{', rotated' if self.rotated else ''})"
        )

    @property
    def rotated(self) -> bool:
        return self.rotations is not None

    def to(self, *args, **kwargs) -> "Codebooks":
        rot = None if self.rotations is None else [r.to(*args, **kwargs) for r in self.rotations]
        return Codebooks([t.to(*args, **kwargs) for t in self.tensors], model_type=self.model_type,
                         hidden_size=self.hidden_size, rotations=rot)

    def bits_per_token(self) -> int:
        return self.groups * self.bits

    # -- model check -----------------------------------------------------------------------------
    def check_model(self, model) -> None:
        """Raise ValueError unless these codebooks fit ``model`` (family, hidden size, layer count)."""
        from .models import family_of

        fam = family_of(model)
        if fam.name != self.model_type:
            raise ValueError(f"codebooks were built for model_type {self.model_type!r}, model is {fam.name!r}")
        if fam.hidden_size != self.hidden_size:
            raise ValueError(f"codebooks have hidden_size {self.hidden_size}, model has {fam.hidden_size}")
        if fam.num_layers != self.num_layers:
            raise ValueError(f"codebooks have {self.num_layers} layers, model has {fam.num_layers}")

    # -- integrity -------------------------------------------------------------------------------
    def layer_checksums(self) -> List[str]:
        """sha256 of each layer's dtype, shape and bytes."""
        return [tensor_checksum(t) for t in self.tensors]

    def _metadata(self) -> dict:
        meta = {"format": FORMAT, "version": ROTATED_VERSION if self.rotated else FORMAT_VERSION,
                "model_type": self.model_type, "hidden_size": str(self.hidden_size), "num_layers": str(self.num_layers),
                "groups": str(self.groups), "codebook_size": str(self.codebook_size),
                "layer_checksums": ",".join(self.layer_checksums())}
        if self.rotated:
            meta["rotation_checksums"] = ",".join(tensor_checksum(r) for r in self.rotations)
        return meta

    def checksum(self) -> str:
        """sha256 of the metadata and every layer's checksum: the identity of these codebooks."""
        return metadata_checksum(self._metadata())

    # -- persistence -----------------------------------------------------------------------------
    def save(self, path: "str | os.PathLike") -> None:
        from safetensors.torch import save_file

        tensors = {f"layer.{i}": t.detach().contiguous().cpu() for i, t in enumerate(self.tensors)}
        for i, r in enumerate(self.rotations or ()):
            tensors[f"rotation.{i}"] = r.detach().contiguous().cpu()
        meta = self._metadata()
        meta["checksum"] = metadata_checksum(meta)
        save_file(tensors, os.fspath(path), metadata=meta)

    @classmethod
    def load(cls, path: "str | os.PathLike", model=None, *, device="cpu") -> "Codebooks":
        """Load codebooks saved by :meth:`save`, verifying the checksums (a corrupt layer is named); with
        ``model``, also check they fit it. Version-1 files (no checksums) load with a warning."""
        from safetensors import safe_open

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no codebook file at {path}")
        try:
            f = safe_open(path, framework="pt", device="cpu")
        except Exception as e:  # safetensors raises its own error types for malformed files
            raise ValueError(f"{path} is not a valid safetensors file: {e}") from e
        with f:
            meta = f.metadata() or {}
            n, hidden, G, K, model_type = _check_metadata(path, meta)
            rotated = meta["version"] == ROTATED_VERSION
            kinds = ("layer", "rotation") if rotated else ("layer",)
            keys = set(f.keys())
            if keys != {f"{kind}.{i}" for i in range(n) for kind in kinds}:
                names = " and ".join(f"{k}.0..{k}.{n - 1}" for k in kinds)
                raise ValueError(f"{path}: expected tensors {names}, found {sorted(keys)}")
            tensors = [f.get_tensor(f"layer.{i}") for i in range(n)]
            rotations = [f.get_tensor(f"rotation.{i}") for i in range(n)] if rotated else None
        if meta["version"] != UNCHECKED_VERSION:
            _verify(path, "layer", tensors, meta["layer_checksums"])
        if rotated:
            _verify(path, "rotation", rotations, meta.get("rotation_checksums", ""))
            rotations = [r.to(device) for r in rotations]
        cb = cls([t.to(device) for t in tensors], model_type=model_type, hidden_size=hidden, rotations=rotations)
        if cb.groups != G or cb.codebook_size != K:
            raise ValueError(f"{path}: metadata says G={G}, K={K} but tensors are {tuple(tensors[0].shape)}")
        if model is not None:
            cb.check_model(model)
        return cb

    @classmethod
    def random(cls, model, *, groups: int, codebook_size: int, seed: int = 0, scale: float = 1.0) -> "Codebooks":
        """Gaussian random codebooks (for tests; use :func:`astra.calibrate` for useful ones)."""
        from .models import family_of

        fam = family_of(model)
        D = fam.hidden_size
        if D % groups:
            raise ValueError(f"hidden size {D} is not divisible by G={groups}")
        g = torch.Generator().manual_seed(seed)
        t = [torch.randn(groups, codebook_size, D // groups, generator=g) * scale for _ in range(fam.num_layers)]
        return cls(t, model_type=fam.name, hidden_size=D)


def _verify(path: str, kind: str, tensors: Sequence[torch.Tensor], sums_text: str) -> None:
    sums = sums_text.split(",")
    for i, t in enumerate(tensors):
        if i >= len(sums) or tensor_checksum(t) != sums[i]:
            raise ValueError(f"{path}: {kind} {i} fails its checksum: the file is corrupt (re-calibrate or restore it)")


#: how far ``R.T @ R`` may be from the identity (float64, largest entry) for a rotation to count as orthogonal:
#: 1e-4, and 0.1 for a rotation rounded to 16 bits
ORTHOGONAL_TOL = 1e-4
ORTHOGONAL_TOL_16BIT = 0.1


def _checked_rotations(rotations, layers: int, hidden_size: int) -> Optional[List[torch.Tensor]]:
    if rotations is None:
        return None
    rotations = list(rotations)
    if len(rotations) != layers:
        raise ValueError(f"{len(rotations)} rotations for {layers} codebook layers; give one per layer")
    eye = torch.eye(hidden_size, dtype=torch.float64)
    for i, r in enumerate(rotations):
        if not isinstance(r, torch.Tensor) or r.dtype not in FLOAT_DTYPES:
            raise ValueError(f"rotation of layer {i} must be a floating tensor, got "
                             f"{getattr(r, 'dtype', type(r).__name__)}")
        if tuple(r.shape) != (hidden_size, hidden_size):
            raise ValueError(f"rotation of layer {i} has shape {tuple(r.shape)}; "
                             f"expected [{hidden_size}, {hidden_size}]")
        check_finite(f"rotation of layer {i}", r)
        r64 = r.detach().double().cpu()
        off = float((r64.t() @ r64 - eye).abs().max())
        if off > (ORTHOGONAL_TOL_16BIT if r.dtype in (torch.float16, torch.bfloat16) else ORTHOGONAL_TOL):
            raise ValueError(f"rotation of layer {i} is not orthogonal (max |R^T R - I| = {off:.2e})")
    return rotations


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
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def metadata_checksum(meta: dict) -> str:
    body = "\n".join(f"{k}={meta[k]}" for k in sorted(meta) if k != "checksum")
    return hashlib.sha256(body.encode()).hexdigest()


def _check_metadata(path: str, meta: dict):
    """Format, version and checksum of the metadata; its numbers (num_layers, hidden, G, K, model_type)."""
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not an astra codebook file (metadata format={meta.get('format')!r})")
    version = meta.get("version")
    if version in (FORMAT_VERSION, ROTATED_VERSION):
        if "checksum" not in meta or "layer_checksums" not in meta:
            raise ValueError(f"{path}: codebook file version {version} without its checksums: the file is corrupt")
        if metadata_checksum(meta) != meta["checksum"]:
            raise ValueError(f"{path}: the metadata fails its checksum: the file is corrupt")
    elif version == UNCHECKED_VERSION:
        if set(meta) - {"format", "version", "model_type", "hidden_size", "num_layers", "groups", "codebook_size"}:
            raise ValueError(f"{path}: codebook file version 1 with unexpected metadata {sorted(meta)}: corrupt")
        warnings.warn(f"{path}: codebook file version 1 has no checksums, so corruption can not be detected; "
                      "re-save it with Codebooks.save to add them", UserWarning, stacklevel=3)
    else:
        raise ValueError(f"{path}: unsupported codebook format version {version!r}")
    try:
        return (int(meta["num_layers"]), int(meta["hidden_size"]), int(meta["groups"]), int(meta["codebook_size"]),
                meta["model_type"])
    except (KeyError, ValueError) as e:
        raise ValueError(f"{path}: missing or malformed codebook metadata ({e})") from e
