"""Quality metrics: Fréchet distance vs closed forms, FD-digits ordering, PSNR by hand, the shipped classifier."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from denoq import metrics
from denoq.errors import DenoqError
from denoq.models.classifier import CLASSIFIER_DIR, CONFIG_FILE, WEIGHTS_FILE, load_classifier
from denoq.models.digits_data import load_digits_16, split_indices


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    return load_digits_16()


@pytest.fixture(scope="module")
def halves(digits: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    x, _ = digits
    perm = torch.from_numpy(np.random.default_rng(0).permutation(len(x)))
    return perm[: len(x) // 2], perm[len(x) // 2 :]


def _random_rotation(d: int, seed: int) -> np.ndarray:
    q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((d, d)))
    return q * np.sign(np.diag(r))


# ---- frechet_distance -------------------------------------------------------------------------------------------


def test_frechet_distance_one_dimensional_by_hand() -> None:
    # N(0, 1) vs N(1, 4): (0 - 1)² + 1 + 4 - 2·sqrt(1·4) = 2
    assert metrics.frechet_distance(np.array([0.0]), np.array([[1.0]]), np.array([1.0]), np.array([[4.0]])) == (
        pytest.approx(2.0, abs=1e-9)
    )


def test_frechet_distance_matches_closed_form_for_diagonal_gaussians() -> None:
    rng = np.random.default_rng(1)
    d = 16
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    v1, v2 = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    got = metrics.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2))
    assert got == pytest.approx(expected, rel=1e-9)
    # the same pair of gaussians in a rotated basis: same distance (catches an elementwise instead of a matrix sqrt)
    q = _random_rotation(d, 2)
    rotated = metrics.frechet_distance(q @ mu1, q @ np.diag(v1) @ q.T, q @ mu2, q @ np.diag(v2) @ q.T)
    assert rotated == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_of_a_gaussian_with_itself_is_zero() -> None:
    rng = np.random.default_rng(3)
    a = rng.standard_normal((64, 64))
    sigma = a @ a.T / 64 + 0.01 * np.eye(64)
    mu = rng.standard_normal(64)
    assert metrics.frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_handles_singular_covariances() -> None:
    # sigma1 sigma2 = 0: closed form 0 + 1 + 1 - 0 = 2; must come back finite, not nan
    got = metrics.frechet_distance(np.zeros(2), np.diag([1.0, 0.0]), np.zeros(2), np.diag([0.0, 1.0]))
    assert math.isfinite(got) and got == pytest.approx(2.0, abs=1e-3)


def test_frechet_distance_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError):
        metrics.frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


# ---- FD-digits ------------------------------------------------------------------------------------------------------


def test_features_shape_and_stats(digits: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, _ = digits
    f = metrics.classifier_features(x[:300])  # crosses a FEATURE_BATCH boundary
    assert f.shape == (300, 64) and f.dtype == np.float64
    np.testing.assert_allclose(f[:5], metrics.classifier_features(x[:5]), rtol=1e-5, atol=1e-5)
    mu, sigma = metrics.feature_stats(f)
    np.testing.assert_allclose(mu, f.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(f.T), rtol=1e-12)
    ref_mu, ref_sigma = metrics.digits_reference_stats()
    assert ref_mu.shape == (64,) and ref_sigma.shape == (64, 64)
    assert np.linalg.eigvalsh(ref_sigma).min() > 0  # no dead feature units: a full-rank reference covariance


def test_fd_of_a_set_with_itself_is_zero(digits: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, _ = digits
    assert metrics.fd_digits(x) == pytest.approx(0.0, abs=1e-6)
    assert metrics.fd_between(x[:500], x[:500]) == pytest.approx(0.0, abs=1e-6)


def test_fd_orders_real_halves_blurred_and_noise(
    digits: tuple[torch.Tensor, torch.Tensor], halves: tuple[torch.Tensor, torch.Tensor]
) -> None:
    x, _ = digits
    ia, ib = halves
    kernel = torch.tensor([1.0, 2.0, 1.0])
    kernel = (kernel[:, None] * kernel[None, :] / 16).view(1, 1, 3, 3)
    blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), value=-1.0), kernel)
    shifted = torch.roll(x, shifts=(1, 1), dims=(2, 3))
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))

    real = metrics.fd_between(x[ia], x[ib])
    fd_blur = metrics.fd_between(x[ia], blurred[ib])
    fd_shift = metrics.fd_between(x[ia], shifted[ib])
    fd_noise = metrics.fd_between(x[ia], noise[ib])
    assert 0 < real < 0.5 * fd_blur
    assert real < 0.5 * fd_shift
    assert max(fd_blur, fd_shift) < 0.5 * fd_noise
    # against the full reference: a real half is close, noise is far
    assert metrics.fd_digits(x[ia]) < 0.1 * metrics.fd_digits(noise[ib])


def test_fd_digits_clamps_to_model_range(digits: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, _ = digits
    loud = 3.0 * x[:400]
    assert metrics.fd_digits(loud) == pytest.approx(metrics.fd_digits(loud.clamp(-1.0, 1.0)), rel=1e-9)
    with pytest.raises(ValueError):
        metrics.fd_digits(x[:, :, :8, :8])


# ---- PSNR -----------------------------------------------------------------------------------------------------------


def test_psnr_by_hand() -> None:
    a = torch.zeros(2, 1, 2, 2)
    b = a.clone()
    b[0, 0, 0, 0] = 0.5  # MSE 0.25 / 4 = 0.0625 → 10·log10(4 / 0.0625) = 10·log10(64)
    b[1] = 0.1  # MSE 0.01 → 10·log10(400)
    expected = (10 * math.log10(64) + 10 * math.log10(400)) / 2  # mean of per-image PSNR, not PSNR of mean MSE
    assert metrics.psnr(a, b) == pytest.approx(expected, rel=1e-6)  # float32 0.1 is not exactly 0.1
    assert metrics.psnr(b, a) == pytest.approx(expected, rel=1e-6)
    assert metrics.psnr(a, b, data_range=1.0) == pytest.approx(expected - 20 * math.log10(2), rel=1e-6)


def test_psnr_of_identical_images_is_the_finite_cap() -> None:
    a = torch.rand(3, 1, 16, 16) * 2 - 1
    assert metrics.psnr(a, a) == metrics.PSNR_CAP_DB
    b = a.clone()
    b[0, 0, 0, 0] += 0.5  # one image differs: (PSNR_0 + 100 + 100) / 3
    psnr0 = 10 * math.log10(4 / (0.25 / 256))
    assert metrics.psnr(a, b) == pytest.approx((psnr0 + 200) / 3, rel=1e-6)
    with pytest.raises(ValueError):
        metrics.psnr(a, a[:2])


# ---- the shipped classifier ---------------------------------------------------------------------------------------


def test_shipped_classifier_test_split_accuracy(digits: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = digits
    _, test_idx = split_indices(len(x), 0.2, 0)
    acc = metrics.class_accuracy(x[test_idx], y[test_idx])
    assert acc >= 0.95
    config = json.loads((CLASSIFIER_DIR / CONFIG_FILE).read_text())
    assert config["test_accuracy"] == pytest.approx(acc, abs=1.5 / len(test_idx))  # the config tells the truth
    assert config["architecture"]["feature_dim"] == 64
    assert (CLASSIFIER_DIR / WEIGHTS_FILE).stat().st_size < 1_000_000
    model = load_classifier()
    assert model is load_classifier() and not model.training
    # class accuracy is computed against the given labels, not something else
    assert metrics.class_accuracy(x[test_idx], (y[test_idx] + 1) % 10) < 0.05


@pytest.mark.parametrize("damage", ["garbage", "truncated", "missing", "bad_config"])
def test_damaged_classifier_files_raise_denoq_error(tmp_path, damage: str) -> None:
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        shutil.copy(CLASSIFIER_DIR / name, tmp_path / name)
    weights, config = tmp_path / WEIGHTS_FILE, tmp_path / CONFIG_FILE
    if damage == "garbage":
        weights.write_bytes(b"\x00not a safetensors file" * 10)
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "missing":
        weights.unlink()
    else:
        config.write_text("{ not json")
    broken = config if damage == "bad_config" else weights
    with pytest.raises(DenoqError) as info:
        load_classifier(tmp_path)
    message = str(info.value)
    assert str(broken) in message and "train_classifier.py" in message and "\n" not in message
