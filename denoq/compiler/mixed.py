"""Mixed artifacts: step-aware mixed precision (PTQD) as one artifact folder whose members are compiled artifacts.

`denoq compile MODEL --recipe w4a8 --set precision.mixed=w8a8 --out ART` compiles every candidate of
`recipe.mixed_members` into `ART/members/<preset>/` (each a complete artifact: plan, Q/DQ graph, PTQD head), then
measures each member's Q/DQ graph in ONNX Runtime on the FP calibration trajectories (every step of
`calib.sampler` with `calib.steps`), chooses a member per step (`calibrators.stepprec`) and writes the manifest's
`mixed` section: the members, the criterion, the sampler and steps, per step the chosen member with SNR_Q of every
member and SNR_F, and the BOPs per model call of each member and per image of the mix. Sampling dispatches each
step to its member's backend (`mixed_backend`); another sampler or step count is refused, as for PTQD statistics.
"""

from __future__ import annotations

from typing import Any

import torch

from denoq.compiler.artifact import Artifact
from denoq.compiler.backends import EpsFn, make_backend, sampling_variance
from denoq.compiler.load import ModelSpec
from denoq.errors import DenoqError

MEMBERS_DIR = "members"
SNR_BATCH = 64
CRITERION = "cheapest member with SNR_Q(t) >= SNR_F(t) = alpha_bar/(1 - alpha_bar), else the highest SNR_Q (PTQD)"


def is_mixed(art: Artifact) -> bool:
    return "mixed" in art.manifest


def members(art: Artifact) -> dict[str, Artifact]:
    """The member artifacts of a mixed artifact, by name (their files are hashed in the mixed manifest)."""
    return {name: Artifact.open(art.path / MEMBERS_DIR / name, verify=False)
            for name in art.manifest["mixed"]["members"]}


def check_sampler(art: Artifact, sampler: str, steps: int) -> None:
    """Refuse a sampler / step count other than the one the per-step choice was made for."""
    meta = art.manifest["mixed"]
    if meta["sampler"] != sampler or meta["num_steps"] != steps:
        raise DenoqError(f"{art.path}: the per-step precision choice was made for {meta['sampler']} "
                         f"{meta['num_steps']} steps, sampling with {sampler} {steps} steps; sample with --sampler "
                         f"{meta['sampler']} --steps {meta['num_steps']} or recompile with --set calib.sampler="
                         f"{sampler} --set calib.steps={steps}")


def choice_table(art: Artifact) -> torch.Tensor:
    """int64 [T]: the index (into `mixed.members`) of the member that runs training timestep t; −1 where the
    sampler never steps."""
    meta = art.manifest["mixed"]
    T = int(art.manifest["scheduler"].get("num_train_timesteps", 1000))
    table = torch.full((T,), -1, dtype=torch.int64)
    for row in meta["steps"]:
        table[int(row["t"])] = meta["members"].index(row["member"])
    return table


def mixed_backend(art: Artifact, backend: str, sampler: str, steps: int, *, threads: int | None = None,
                  spec: ModelSpec | None = None) -> EpsFn:
    """The eps callable of a mixed artifact: each sample's timestep goes to its member's backend `backend`."""
    check_sampler(art, sampler, steps)
    parts = members(art)
    names = art.manifest["mixed"]["members"]
    if backend.endswith("-fp"):
        return make_backend(parts[names[0]], backend, threads=threads, spec=spec)  # every member: the same FP model
    fns = [make_backend(parts[n], backend, threads=threads, spec=spec) for n in names]
    table = choice_table(art)

    def eps(x: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor:
        t = t.reshape(-1).expand(x.shape[0])
        who = table[t.cpu()]
        if bool((who < 0).any()):
            bad = int(t[who < 0][0])
            raise DenoqError(f"{art.path}: timestep {bad} is not a step of {art.manifest['mixed']['sampler']} "
                             f"{art.manifest['mixed']['num_steps']}, which the per-step precision choice covers")
        out = torch.empty_like(x)
        for i in sorted(set(who.tolist())):
            rows = torch.nonzero(who == i).squeeze(1)
            sub = None if cond is None else cond[rows.to(cond.device)]
            out[rows.to(x.device)] = fns[i](x[rows.to(x.device)], t[rows.to(t.device)], sub)
        return out

    return eps


def mixed_variance(art: Artifact, backend: str, sampler: str, steps: int) -> torch.Tensor | None:
    """The VSC residual variance per timestep: each step takes its member's (None when no member calibrates
    the variance schedule)."""
    check_sampler(art, sampler, steps)
    parts = members(art)
    names = art.manifest["mixed"]["members"]
    tables = [sampling_variance(parts[n], backend, sampler, steps) for n in names]
    if all(v is None for v in tables):
        return None
    table = choice_table(art)
    T = table.shape[0]
    out = torch.zeros(T, dtype=torch.float32)
    for i, v in enumerate(tables):
        if v is not None:
            out[table == i] = v[table == i]
    return out
