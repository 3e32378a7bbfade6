"""How far MiniLM's k-means codebooks are from the rate-distortion limit, layer by layer: the accuracy study's MiniLM
task (bench/accuracy.py: packaged all-MiniLM-L6-v2, 1500 train / 300 held-out `pydoc_data` sentences), G groups of
K = 1024 codewords (log2 K bits each), calibrated as ``astra.calibrate`` does (attention basis; ``--predict``:
predictive codebooks, the prediction's residual quantized in closed loop). For every layer, on the training tokens
and on the held-out ones, the distortion of the quantized vectors (in the basis they are quantized in, so the
attention metric's) as a fraction of their variance, against the distortion-rate function of a Gaussian source
with the same covariance at the same bits a token (reverse water-filling over its eigenvalues), and against the
white-Gaussian figure 2^(-2 bits / D) that ignores the spectrum.

A Gaussian has the largest distortion of all sources of one covariance at a given rate, so the real data's limit
is at or below the Gaussian's: the ratio k-means / Gaussian is a lower bound on what a perfect quantizer of
these bits could gain over k-means.

    PYTHONPATH=.:python python bench/rate_distortion.py --predict [--groups 32] [--threads 2]

``--classes 4,8,16`` adds, on the training tokens, the Gaussian limit *given side information both sides hold*: the
tokens are classed by their prediction (k-means of the prediction, in the quantized basis, into C classes; the
embedding output for layer 0) and each class gets its own covariance, as a quantizer with one codebook a class
(chosen by the class, so it costs no bits) could use. Each class's limit is set against the pooled covariance's limit
on a random sample of the class's size, so the estimation bias of a smaller sample is in both.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import accuracy as A  # noqa: E402

import astra_kernels as ak  # noqa: E402
from astra import bases  # noqa: E402
from astra.calibrate import collect_hidden_states, fit_predictor, kmeans  # noqa: E402
from astra.codebooks import apply_predictor  # noqa: E402
from astra.models import family_of  # noqa: E402


def gaussian_distortion(eigenvalues: torch.Tensor, bits: float) -> float:
    """Total distortion of the best code of ``bits`` bits a vector for a Gaussian with these covariance eigenvalues:
    reverse water-filling, ``D = sum min(theta, lambda_i)`` at the water level ``theta`` where
    ``sum max(0, log2(lambda_i / theta) / 2) = bits`` (found by bisection on ``log theta``)."""
    lam = eigenvalues.double().clamp_min(1e-300)
    lo, hi = math.log(float(lam.min())) - 60.0, math.log(float(lam.max()))
    for _ in range(200):
        mid = (lo + hi) / 2
        if float((0.5 * torch.log2(lam / math.exp(mid))).clamp_min(0).sum()) > bits:
            lo = mid
        else:
            hi = mid
    return float(lam.clamp_max(math.exp(hi)).sum())


def fractions(y: torch.Tensor, y_hat: torch.Tensor, bits: float) -> tuple:
    """(k-means distortion, Gaussian limit, white-Gaussian figure), each as a fraction of ``y``'s variance."""
    yc = (y - y.mean(0)).double()
    var = float(yc.pow(2).sum(1).mean())
    lam = torch.linalg.eigvalsh(yc.t() @ yc / len(yc))
    measured = float((y - y_hat).double().pow(2).sum(1).mean())
    return measured / var, gaussian_distortion(lam, bits) / var, 2.0 ** (-2.0 * bits / y.shape[1])


class Layer:
    """One layer's quantizer, fitted on the training tokens and applied to any tokens."""

    def __init__(self, fam, l: int, h: torch.Tensor, emb, prev, a):
        self.W, self.b = fit_predictor(emb, prev, h) if a.predict else (None, None)
        resid = h.double() - self.predict(emb, prev)
        self.T, self.T_inv = bases.layer_basis(fam, l, h, a.groups, "attention", quantized=resid)
        self.C = kmeans(self.vectors(h, emb, prev), a.groups, 1024, iters=10, seed=l)

    def predict(self, emb, prev) -> torch.Tensor:
        return 0.0 if self.W is None else apply_predictor(self.W, self.b, emb, prev)

    def vectors(self, h, emb, prev) -> torch.Tensor:
        return ((h.double() - self.predict(emb, prev)) @ self.T).float()

    def quantized(self, y: torch.Tensor) -> torch.Tensor:
        return ak.vq_decode(ak.vq_encode(y, self.C), self.C)

    def reconstruction(self, y_hat: torch.Tensor, emb, prev) -> Optional[torch.Tensor]:
        """The receiver's reconstruction (what the next layer's prediction reads; None: not predictive)."""
        return None if self.W is None else self.predict(emb, prev) + y_hat.double() @ self.T_inv


def limit_and_variance(y: torch.Tensor, bits: float) -> tuple:
    """(the Gaussian limit of ``y``'s covariance at ``bits`` bits a vector, ``y``'s variance), both totals."""
    yc = (y - y.mean(0)).double()
    return gaussian_distortion(torch.linalg.eigvalsh(yc.t() @ yc / len(yc)), bits), float(yc.pow(2).sum(1).mean())


def conditional_limit(y: torch.Tensor, side: torch.Tensor, classes: int, bits: float, min_class: int = 400) -> tuple:
    """(the limit given the class of ``side``, the pooled limit on samples of the same sizes), each as a fraction of
    ``y``'s variance; classes under ``min_class`` tokens are left out of both."""
    cent = kmeans(side.float(), 1, classes, iters=10, seed=0)
    cls = ak.vq_encode(side.float(), cent).reshape(-1)
    g = torch.Generator().manual_seed(0)
    cond = pooled = 0.0
    n_in = 0
    for c in range(classes):
        n = int((cls == c).sum())
        if n >= min_class:
            n_in += n
            cond += limit_and_variance(y[cls == c], bits)[0] * n
            pooled += limit_and_variance(y[torch.randperm(len(y), generator=g)[:n]], bits)[0] * n
    total = limit_and_variance(y, bits)[1] * n_in
    return cond / total, pooled / total


def given_classes(layer: Layer, y: torch.Tensor, emb, prev, classes: int, bits: float) -> str:
    """The table cell of :func:`conditional_limit`: the side information is the layer's prediction in the quantized
    basis (layer 0, and plain codebooks: the embedding output)."""
    side = emb if layer.W is None or prev is None else layer.predict(emb, prev) @ layer.T
    cond, pooled = conditional_limit(y, side, classes, bits)
    return f"{cond:.3f} ({pooled:.3f}, {cond / pooled:.2f}x)"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--groups", type=int, default=32, help="G (default: 32)")
    ap.add_argument("--predict", action="store_true", help="predictive codebooks (astra.calibrate(predict=True))")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    ap.add_argument("--classes", default="", help="comma-separated C: the limit given the prediction's class "
                                                  "(training tokens)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    task = A.minilm_task(A.Size())
    fam = family_of(task.model)
    sets = {name: collect_hidden_states(task.model, batches, max_tokens=50000 if name == "train" else None,
                                        embeddings=True)
            for name, batches in (("train", task.train), ("held-out", task.test))}
    prev = {name: None for name in sets}
    bits = a.groups * 10.0
    print(f"G = {a.groups}, K = 1024 ({bits:g} bits a token), {'predictive' if a.predict else 'plain'}, attention "
          f"basis; distortion / variance (white Gaussian: {2.0 ** (-2.0 * bits / fam.hidden_size):.3f})\n")
    classes = [int(c) for c in a.classes.split(",") if c]
    print("| layer | train: k-means | train: Gaussian limit | ratio | held-out: k-means | held-out: Gaussian limit "
          "| ratio |" + "".join(f" train: limit given {c} classes (pooled, same sizes) |" for c in classes)
          + "\n|---|---|---|---|---|---|---|" + "---|" * len(classes))
    for l in range(fam.num_layers):
        hs, emb = sets["train"]
        layer = Layer(fam, l, hs[l], emb, prev["train"], a)
        row, given = [str(l)], []
        for name, (hs, emb) in sets.items():
            y = layer.vectors(hs[l], emb, prev[name])
            y_hat = layer.quantized(y)
            measured, limit, _ = fractions(y, y_hat, bits)
            row += [f"{measured:.3f}", f"{limit:.3f}", f"{measured / limit:.2f}x"]
            if name == "train":
                given = [given_classes(layer, y, emb, prev[name], c, bits) for c in classes]
            prev[name] = layer.reconstruction(y_hat, emb, prev[name])
        print("| " + " | ".join(row + given) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
