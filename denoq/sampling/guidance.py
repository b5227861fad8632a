"""Classifier-free guidance around any eps backend (Ho & Salimans, "Classifier-Free Diffusion Guidance", 2022).

    ε̃(x, t, c) = ε(x, t, ∅) + s · (ε(x, t, c) − ε(x, t, ∅))                                          (eq. 6)

with ∅ the null conditioning the model was trained with (label dropout) and s the guidance scale (s = 1 is the
conditional model, s = 0 the unconditional one). Both halves run as one doubled batch, as deployments do
(one engine call per step): rows [0, B) are unconditional, rows [B, 2B) conditional. A model that also predicts
its variance (DiT's learned Σ: twice the sample's channels) is guided on the ε channels; the variance channels are
the conditional half's, as GLIDE and DiT sample.
"""

from __future__ import annotations

from typing import Any

import torch

from denoq.errors import DenoqError
from denoq.sampling.cond import Cond, cat, repeat_rows
from denoq.sampling.loop import EpsFn


def classifier_free(eps: EpsFn, null_cond: Cond, scale: float | torch.Tensor) -> EpsFn:
    """The guided eps of eq. 6; `null_cond` is one sample's null conditioning (the null label, shape []; the
    empty or negative prompt's encoding, a batch of 1);
    `scale` one number, or one per sample ([B], e.g. calibration trajectories at several scales)."""
    scales = torch.as_tensor(scale, dtype=torch.float32).reshape(-1)
    if not bool((scales >= 0).all()):
        raise DenoqError(f"guidance scale {scale} must be ≥ 0 (1 = the conditional model, 0 = unconditional)")
    per_sample = scales.numel() > 1

    def guided(x: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor:
        if cond is None:
            raise DenoqError("classifier-free guidance needs the conditioning (e.g. --label)")
        batch = x.shape[0]
        tt = torch.as_tensor(t).reshape(-1)
        tt = tt.expand(batch) if tt.numel() == 1 else tt
        out = eps(torch.cat([x, x]), torch.cat([tt, tt]), cat([repeat_rows(null_cond, cond, batch), cond]))
        c = x.shape[1]
        uncond, conditional = out[:batch, :c], out[batch:, :c]
        if per_sample:
            if scales.numel() != batch:
                raise DenoqError(f"{scales.numel()} guidance scales for a batch of {batch}; give one per sample")
            s = scales.to(out.device, out.dtype).reshape(-1, *[1] * (out.dim() - 1))
        else:
            s = scale
        return torch.cat([uncond + s * (conditional - uncond), out[batch:, c:]], dim=1)

    return guided
