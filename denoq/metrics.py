"""Sample-quality metrics: FD-digits, FD between two sample sets, PSNR, class accuracy.

Bottom layer: imports torch, numpy, scipy and `denoq.models` only.

Every image argument is a float tensor `[N, 1, 16, 16]` in model range [-1, 1] (what the embedded models sample).
FD features are the 64-d penultimate activations of the shipped digits classifier
(`denoq.models.classifier.load_classifier`), computed on the CPU in float32 batches of `FEATURE_BATCH` after
clamping to [-1, 1]; statistics and the distance are computed in float64. FD from a few hundred samples carries
a visible small-sample bias, so compare FDs measured on the same number of samples (≥ 500 recommended; 1797 real
digits form the reference).
"""

from __future__ import annotations

import functools
import warnings

import numpy as np
import torch
from scipy import linalg

from denoq.models.classifier import load_classifier
from denoq.models.digits_data import IMAGE_SIZE, load_digits_16

FEATURE_BATCH = 256
PSNR_CAP_DB = 100.0  # reported for identical images (MSE 0), and the ceiling of every per-image PSNR


def _check_images(x: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or tuple(x.shape[1:]) != (1, IMAGE_SIZE, IMAGE_SIZE):
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name}: expected a tensor [N, 1, {IMAGE_SIZE}, {IMAGE_SIZE}], got {shape}")
    return x.detach().to("cpu", torch.float32)


@torch.no_grad()
def classifier_features(samples: torch.Tensor) -> np.ndarray:
    """Penultimate features `[N, 64]` (float64) of `samples` `[N, 1, 16, 16]`, clamped to [-1, 1] first."""
    x = _check_images(samples, "samples").clamp(-1.0, 1.0)
    model = load_classifier()
    feats = [model.features(x[i : i + FEATURE_BATCH]) for i in range(0, x.shape[0], FEATURE_BATCH)]
    return torch.cat(feats).double().numpy() if feats else np.zeros((0, model.feature_dim))


def feature_stats(features: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean `[D]` and unbiased covariance `[D, D]` (float64) of `features` `[N, D]`, N ≥ 2."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"feature_stats: expected [N, D] features with N >= 2, got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (Heusel et al. 2017, eq. 6):

        d² = ‖mu1 − mu2‖² + Tr(sigma1 + sigma2 − 2 (sigma1 sigma2)^½)

    As the reference FID code (pytorch-fid, TTUR) does: if the matrix square root of the product is not finite
    (near-singular covariances), retry with `eps`·I added to both covariances; drop a negligible imaginary part
    that `sqrtm` leaves from rounding, and raise `ValueError` if it is not negligible. Tiny negative results from
    rounding are clipped to 0.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        shapes = f"mu {mu1.shape} / {mu2.shape}, sigma {sigma1.shape} / {sigma2.shape}"
        raise ValueError(f"frechet_distance: shapes do not match: {shapes}")
    diff = mu1 - mu2
    with warnings.catch_warnings():  # "matrix is singular": the reference code silences it too (disp=False)
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        imag = np.max(np.abs(np.diagonal(covmean).imag))
        if imag > 1e-3:
            raise ValueError(f"frechet_distance: sqrtm(sigma1 sigma2) has an imaginary component {imag:.3g}")
        covmean = covmean.real
    d2 = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean)
    return max(float(d2), 0.0)


@functools.lru_cache(maxsize=1)
def digits_reference_stats() -> tuple[np.ndarray, np.ndarray]:
    """Feature (mu, sigma) of all 1797 real digits through the shipped classifier; computed once, read-only."""
    images, _ = load_digits_16()
    mu, sigma = feature_stats(classifier_features(images))
    mu.setflags(write=False)
    sigma.setflags(write=False)
    return mu, sigma


def fd_digits(samples: torch.Tensor) -> float:
    """FD-digits: Fréchet distance between `samples` `[N, 1, 16, 16]` (clamped to [-1, 1]) and all real digits."""
    return frechet_distance(*feature_stats(classifier_features(samples)), *digits_reference_stats())


def fd_between(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between two sample sets in the classifier's feature space (e.g. FD-to-FP-samples)."""
    return frechet_distance(*feature_stats(classifier_features(a)), *feature_stats(classifier_features(b)))


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> float:
    """Mean over images of the per-image PSNR in dB, `10·log10(data_range² / MSE_i)`.

    `a` and `b` have the same shape `[N, ...]` (dimension 0 is the image); values are compared as given (no
    clamping), with `data_range` 2.0 for model range [-1, 1]. Each per-image PSNR is capped at `PSNR_CAP_DB`
    (100 dB), so identical images count as 100 dB instead of infinity and the mean stays finite.
    """
    if a.shape != b.shape or a.dim() < 1 or a.shape[0] == 0:
        raise ValueError(f"psnr: expected two equal non-empty [N, ...] shapes, got {tuple(a.shape)}, {tuple(b.shape)}")
    diff = a.detach().to("cpu", torch.float64) - b.detach().to("cpu", torch.float64)
    mse = diff.reshape(diff.shape[0], -1).square().mean(dim=1)
    per_image = 10.0 * torch.log10(data_range**2 / mse)  # mse 0 → +inf, capped below
    return per_image.clamp(max=PSNR_CAP_DB).mean().item()


@torch.no_grad()
def class_accuracy(samples: torch.Tensor, labels: torch.Tensor | np.ndarray) -> float:
    """Fraction of `samples` `[N, 1, 16, 16]` (clamped to [-1, 1]) the shipped classifier assigns their `labels` [N]."""
    x = _check_images(samples, "samples").clamp(-1.0, 1.0)
    y = labels.detach().cpu() if isinstance(labels, torch.Tensor) else torch.as_tensor(np.asarray(labels))
    y = y.long().reshape(-1)
    if y.shape[0] != x.shape[0] or x.shape[0] == 0:
        raise ValueError(f"class_accuracy: {x.shape[0]} samples but {y.shape[0]} labels")
    model = load_classifier()
    pred = torch.cat([model(x[i : i + FEATURE_BATCH]).argmax(1) for i in range(0, x.shape[0], FEATURE_BATCH)])
    return (pred == y).double().mean().item()
