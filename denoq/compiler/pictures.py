"""Pictures for people: sample grids, FP-vs-quantized side by side, per-layer error bars, error per timestep,
activation ranges per timestep against timestep-grouped clipping levels.

Every function returns PNG bytes (matplotlib with the Agg backend; no display needed).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

from denoq.figures import figure_png

UPSCALE = 4


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    """[N, C, H, W] in [-1, 1] → [N, H, W, C] uint8."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def grid_image(x: torch.Tensor, ncol: int | None = None, pad: int = 2) -> Image.Image:
    """The samples `x` ([N, C, H, W], model range) as one grid image, each upscaled ×4 (nearest)."""
    imgs = _to_uint8(x[:, :3] if x.shape[1] >= 3 else x[:, :1])
    n, h, w, c = imgs.shape
    ncol = ncol or math.ceil(math.sqrt(n))
    nrow = math.ceil(n / ncol)
    canvas = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, ncol)
        canvas[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = imgs[i]
    img = Image.fromarray(canvas[..., 0] if c == 1 else canvas)
    return img.resize((img.width * UPSCALE, img.height * UPSCALE), Image.NEAREST)


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def grid_png(x: torch.Tensor) -> bytes:
    return _png(grid_image(x))


def side_by_side_png(left: torch.Tensor, right: torch.Tensor, labels: tuple[str, str]) -> bytes:
    """Two grids of the same samples (e.g. FP and quantized from the same noise) with captions."""
    a, b = grid_image(left).convert("RGB"), grid_image(right).convert("RGB")
    gap, top = 24, 28
    canvas = Image.new("RGB", (a.width + gap + b.width, top + max(a.height, b.height)), "white")
    canvas.paste(a, (0, top))
    canvas.paste(b, (a.width + gap, top))
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 8), labels[0], fill="black")
    draw.text((a.width + gap + 4, 8), labels[1], fill="black")
    return _png(canvas)


def layer_error_png(names: list[str], sqnr_db: list[float], title: str) -> bytes:
    """Horizontal bars: SQNR (dB, higher is better) of each layer's output, quantized vs FP, in network order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, max(3, 0.16 * len(names))))
    y = np.arange(len(names))
    ax.barh(y, sqnr_db, color="#4477aa")
    ax.set_yticks(y, names, fontsize=6)
    ax.invert_yaxis()
    ax.set_xlabel("output SQNR vs FP (dB, higher is better)")
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    return figure_png(fig)


def timestep_error_png(t: list[int], series: dict[str, list[float]], ylabel: str, title: str) -> bytes:
    """One line per series over the sampler's timesteps (x axis: timestep, descending as sampling runs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for label, values in series.items():
        ax.plot(t, values, marker=".", label=label)
    ax.set_xlabel("timestep t")
    ax.set_ylabel(ylabel)
    ax.invert_xaxis()
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return figure_png(fig)


@dataclass(frozen=True)
class GroupPanel:
    """One layer of `timestep_groups_png`: the observed activation range of its input per sampler timestep
    (`observed`, aligned with the picture's `t`), the quantizer's clipping level over the training timesteps
    `clip_t` (`clip`, a step function: one level per timestep group) and the group boundaries (timesteps where the
    scale changes)."""

    name: str
    observed: list[float]
    clip_t: list[int]
    clip: list[float]
    boundaries: list[float]


def timestep_groups_png(t: list[int], panels: list[GroupPanel], title: str) -> bytes:
    """One panel per layer: max|x| of its input per timestep on the FP trajectory, the clipping level of its
    timestep-grouped quantizer as a step line and the group boundaries as vertical lines (x axis: timestep,
    descending as sampling runs, like `timestep_error_png`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.4 * len(panels)), sharex=True, squeeze=False)
    for ax, panel in zip(axes[:, 0], panels, strict=True):
        ax.plot(t, panel.observed, marker=".", color="#4477aa", label="max |x| on the FP trajectory")
        ax.step(panel.clip_t, panel.clip, where="mid", color="#cc6677", label="clipping level of the quantizer")
        for i, b in enumerate(panel.boundaries):
            ax.axvline(b, color="#999999", linestyle="--", linewidth=0.8, label="group boundary" if i == 0 else None)
        ax.set_title(f"{panel.name} ({len(panel.boundaries) + 1} groups)", fontsize=9)
        ax.set_ylabel("input range")
        ax.grid(alpha=0.3)
    axes[0, 0].invert_xaxis()  # shared x: inverting once inverts every panel
    axes[0, 0].legend(fontsize=7)
    axes[-1, 0].set_xlabel("timestep t")
    fig.suptitle(title)
    return figure_png(fig)
