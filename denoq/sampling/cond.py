"""The conditioning a denoiser takes, and the one rule that calls a diffusers denoiser with it.

A conditioning is None (unconditional), one tensor — `class_labels` int64 [B] or `encoder_hidden_states` float
[B, L, D], the model's third positional input — or a `Conditioning`: several named tensors, each named as the
denoiser's forward names it (diffusers' ONNX exports and TensorRT's demo name the graph inputs the same), so a
`Conditioning` is also the graph's feed:

- SDXL's `UNet2DConditionModel` (`addition_embed_type="text_time"`): `encoder_hidden_states` [B, L, D] and the added
  conditions `text_embeds` [B, P], `time_ids` [B, 6] (passed in `added_cond_kwargs`);
- `PixArtTransformer2DModel`: `encoder_hidden_states` [B, L, D] (T5), `encoder_attention_mask` [B, L] (1 = token,
  0 = padding) and, for PixArt-α at 1024 px, the added conditions `resolution` [B, 2] and `aspect_ratio` [B, 1];
- `SD3Transformer2DModel`: `encoder_hidden_states` [B, L, D] (CLIP-L ‖ CLIP-G, then T5) and `pooled_projections`
  [B, P];
- `FluxTransformer2DModel`: `encoder_hidden_states` [B, L, D] (T5), `pooled_projections` [B, P] (CLIP), the RoPE
  position ids `txt_ids` [L, 3] and `img_ids` [S, 3] — *shared*: no batch axis, as FluxPipeline passes them — and
  Flux-dev's embedded `guidance` [B].

Every other tensor shares the batch axis 0.

Timesteps: a denoiser is called with the scheduler's own timestep values (float for Euler / DPM-Solver with Karras
sigmas). The per-timestep tables of a QuantPlan (timestep-group scales, PTQD) have one row per training timestep
0 … T − 1 and are indexed by the nearest one, `timestep_index` (docs/architecture.md, Timesteps of any scheduler);
the graph computes the same index with Round (half to even, as torch.round) and Clip.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Union

import torch

from denoq.errors import DenoqError

#: conditions a diffusers denoiser takes inside `added_cond_kwargs` (SDXL's, PixArt-α's micro-conditions)
ADDED_CONDITIONS = ("aspect_ratio", "resolution", "text_embeds", "time_ids")
TEXT_INPUT = "encoder_hidden_states"
#: conditions without a batch axis (Flux's RoPE position ids): whole in every row selection
SHARED_CONDITIONS = ("img_ids", "txt_ids")
#: every conditioning graph input denoq feeds, besides the sample and the timestep
COND_INPUTS = ("encoder_hidden_states", "class_labels", "encoder_attention_mask", "pooled_projections", "guidance",
               *SHARED_CONDITIONS, *ADDED_CONDITIONS)


class Conditioning:
    """Named conditioning tensors (`encoder_hidden_states` first, the others sorted by name) with a common batch
    axis 0, but for the shared ones (`SHARED_CONDITIONS`). Indexing selects rows of every batched tensor:
    `cond[2:4]`, `cond[[0, 3]]`."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        if TEXT_INPUT not in tensors:
            raise ValueError(f"a Conditioning needs {TEXT_INPUT}; got {', '.join(tensors)}")
        order = [TEXT_INPUT, *sorted(k for k in tensors if k != TEXT_INPUT)]
        self.tensors = {k: tensors[k] for k in order}
        batches = {v.shape[0] for k, v in self.tensors.items() if k not in SHARED_CONDITIONS}
        if len(batches) != 1:
            raise ValueError(f"conditioning tensors disagree on the batch size: "
                             f"{ {k: tuple(v.shape) for k, v in self.tensors.items()} }")

    def __getitem__(self, rows: Any) -> Conditioning:
        return Conditioning({k: v if k in SHARED_CONDITIONS else v[rows] for k, v in self.tensors.items()})

    def __len__(self) -> int:
        return int(self.tensors[TEXT_INPUT].shape[0])

    def __repr__(self) -> str:
        return f"Conditioning({', '.join(f'{k}={tuple(v.shape)}' for k, v in self.tensors.items())})"

    def to(self, device: torch.device | str) -> Conditioning:
        return Conditioning({k: v.to(device) for k, v in self.tensors.items()})

    def kwargs(self) -> dict[str, Any]:
        """The keyword arguments of the denoiser's forward (`denoiser_kwargs`)."""
        return denoiser_kwargs(self.tensors)


def denoiser_kwargs(named: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword arguments of a diffusers denoiser's forward for named conditioning tensors: each by its name,
    the added conditions (`ADDED_CONDITIONS`) inside `added_cond_kwargs`."""
    direct: dict[str, Any] = {k: v for k, v in named.items() if k not in ADDED_CONDITIONS}
    added = {k: v for k, v in named.items() if k in ADDED_CONDITIONS}
    return {**direct, "added_cond_kwargs": added} if added else direct


Cond = Union[torch.Tensor, Conditioning, None]  # noqa: UP007 (a runtime alias)


def batch_of(cond: Cond) -> int:
    """The number of rows of a (non-None) conditioning."""
    return len(cond) if isinstance(cond, Conditioning) else int(cond.shape[0])


def cat(parts: Sequence[Cond]) -> Cond:
    """Rows of `parts` one after another (`torch.cat` on axis 0, per name for a `Conditioning`)."""
    if parts[0] is None:
        return None
    if isinstance(parts[0], Conditioning):
        for name in SHARED_CONDITIONS:
            if name in parts[0].tensors and not all(torch.equal(p.tensors[name], parts[0].tensors[name])
                                                     for p in parts):
                raise ValueError(f"conditionings with different {name} cannot share one batch")
        return Conditioning({k: parts[0].tensors[k] if k in SHARED_CONDITIONS else
                             torch.cat([p.tensors[k] for p in parts]) for k in parts[0].tensors})
    return torch.cat(list(parts))


def repeat_rows(one: Cond, like: Cond, batch: int) -> Cond:
    """`one` — one sample's conditioning (a label of shape [], or a batch of 1) — repeated to `batch` rows with
    `like`'s per-sample shapes, dtypes and device (the null half of a classifier-free-guidance batch)."""
    if isinstance(one, Conditioning):
        return Conditioning({k: like.tensors[k] if k in SHARED_CONDITIONS else v.to(
            like.tensors[k].device, like.tensors[k].dtype).reshape(1, *like.tensors[k].shape[1:]).expand(
            batch, *like.tensors[k].shape[1:]) for k, v in one.tensors.items()})
    return one.to(like.device, like.dtype).reshape(1, *like.shape[1:]).expand(batch, *like.shape[1:])


def feeds(cond: Cond, name: str | None) -> dict[str, torch.Tensor]:
    """The graph inputs of a conditioning: `{name: cond}` for one tensor, the named tensors of a `Conditioning`."""
    if cond is None:
        return {}
    if isinstance(cond, Conditioning):
        return dict(cond.tensors)
    return {str(name): cond}


def call_denoiser(model: Any, sample: torch.Tensor, timestep: torch.Tensor, cond: Cond = None) -> torch.Tensor:
    """The model's output (`.sample` of a diffusers output) for `sample` at `timestep`: `model(sample, t)`,
    `model(sample, t, cond)` for one tensor, or `model(sample, timestep=t, **cond.kwargs())` for a `Conditioning`
    — how diffusers' pipelines call a denoiser."""
    if cond is None:
        out = model(sample, timestep)
    elif isinstance(cond, Conditioning):
        out = model(sample, timestep=timestep, **cond.kwargs())
    else:
        out = model(sample, timestep, cond)
    return out.sample if hasattr(out, "sample") else out


def timestep_index(t: torch.Tensor, num_train_timesteps: int) -> torch.Tensor:
    """The row of a per-timestep table for scheduler timesteps `t`: the nearest training timestep,
    `clip(round_half_even(t), 0, T − 1)` as int64 (integral timesteps index themselves)."""
    if not t.is_floating_point():
        return t.to(torch.int64).clamp(0, num_train_timesteps - 1)
    return torch.round(t.float()).clamp(0, num_train_timesteps - 1).to(torch.int64)


def backend_output(eps: Any, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
    """`eps(x, t, cond)` as float32, refused in one line unless it is a tensor of x's shape, or with twice x's
    channels (a model that also predicts its variance, `split_variance`): every sampler's contract with its
    backend."""
    out = eps(x, t, cond)
    ok = isinstance(out, torch.Tensor) and out.dim() == x.dim() and out.shape[0] == x.shape[0] and \
        out.shape[2:] == x.shape[2:] and out.shape[1] in (x.shape[1], 2 * x.shape[1])
    if not ok:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise DenoqError(f"the backend returned {got} for x of shape {tuple(x.shape)}; it must match x (or hold "
                         "twice its channels: ε and the variance)")
    return out.to(torch.float32)


def split_variance(out: torch.Tensor, channels: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(model output, predicted variance or None): the first `channels` channels and the rest of a learned-variance
    model's output (DiT's Σ, diffusers' `variance_type="learned_range"`), or (out, None)."""
    if out.shape[1] == channels:
        return out, None
    return out[:, :channels], out[:, channels:]
