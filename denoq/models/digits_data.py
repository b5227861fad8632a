"""scikit-learn's bundled handwritten digits as 16×16 images in [-1, 1].

The 8×8 originals (values 0..16) are upsampled bilinearly to 16×16. This is the training data of the
embedded models and the reference set of FD-digits; everything is offline and deterministic.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_SIZE = 16
NUM_CLASSES = 10


def load_digits_16() -> tuple[torch.Tensor, torch.Tensor]:
    """Return (images [N, 1, 16, 16] float32 in [-1, 1], labels [N] int64) for all 1797 digits."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)
    x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    x = x.clamp(0.0, 1.0) * 2.0 - 1.0
    return x.contiguous(), torch.from_numpy(bunch.target.astype(np.int64))


def split_indices(n: int, test_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic train/test split of range(n)."""
    perm = np.random.default_rng(seed).permutation(n)
    n_test = round(n * test_fraction)
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])
