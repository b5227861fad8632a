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

import time
from pathlib import Path
from typing import Any

import torch

from denoq.calibrators.stepprec import choose_precision, diffusion_snr, precision_png, quantization_snr
from denoq.compiler.artifact import Artifact, ArtifactWriter, check_output_dir
from denoq.compiler.backends import EpsFn, make_backend, sampling_variance, torch_eps
from denoq.compiler.load import ModelSpec, load_model
from denoq.compiler.recipe import Recipe, mixed_members
from denoq.errors import DenoqError
from denoq.sampling import NoiseSchedule

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


def compile_mixed(model: str | None, recipe: Recipe, out: Path, *, force: bool = False, progress: bool = True,
                  quiet: bool = False, allow_parity_failure: bool = False) -> Artifact:
    """Compile every candidate of `precision.mixed` and the per-step choice into the artifact folder `out`."""
    from denoq.compiler.pipeline import compile_model, log, record_pool  # pipeline compiles the members

    check_output_dir(out, force)
    candidates = mixed_members(recipe)
    spec = load_model(model)
    with ArtifactWriter(out, force) as writer:
        arts: dict[str, Artifact] = {}
        for name, member in candidates.items():
            log(f"mixed precision: compiling member {name}", quiet)
            arts[name] = compile_model(model, member, writer.path(f"{MEMBERS_DIR}/{name}"), progress=progress,
                                       quiet=quiet, allow_parity_failure=allow_parity_failure)
        start = time.perf_counter()
        pool = record_pool(spec, recipe, progress)
        fp = torch_eps(spec.module)
        graphs = {name: make_backend(a, "ort") for name, a in arts.items()}
        snr_q = quantization_snr(fp, graphs, pool, SNR_BATCH, progress=progress)
        schedule = NoiseSchedule.from_config(spec.scheduler_config)
        snr_f = {t: diffusion_snr(schedule, t) for t in sorted(set(pool.t))}
        bops = {name: int(a.manifest["cost"]["bops_per_call"]) for name, a in arts.items()}
        choice = choose_precision(snr_q, snr_f, bops)
        names = list(candidates)
        per_image = {name: bops[name] * len(pool.t) for name in names}
        per_image["mixed"] = sum(bops[choice[t]] for t in pool.t)
        runs = {name: sum(1 for t in pool.t if choice[t] == name) for name in names}
        top = max(names, key=lambda n: (bops[n], n))
        log("mixed precision: " + ", ".join(f"{n} runs {runs[n]} steps" for n in names)
            + f"; BOPs per image ×{per_image['mixed'] / per_image[top]:.3f} of all-{top}", quiet)
        title = (f"step-aware precision ({recipe['calib.sampler']} {recipe['calib.steps']}): "
                 + ", ".join(f"{n} {runs[n]} steps" for n in names))
        writer.path("precision.png").write_bytes(precision_png(snr_q, snr_f, choice, title))
        first = arts[names[0]].manifest
        manifest = {
            "recipe": recipe.to_dict(),
            "model": first["model"],
            "scheduler": first["scheduler"],
            "mixed": {
                "members": names, "criterion": CRITERION,
                "sampler": recipe["calib.sampler"], "num_steps": recipe["calib.steps"],
                "steps": [{"t": t, "member": choice[t], "snr_f": snr_f[t],
                           "snr_q": {n: snr_q[n][t] for n in names}} for t in sorted(choice, reverse=True)],
                "steps_per_member": runs, "bops_per_call": bops, "bops_per_image": per_image,
                "seconds": round(time.perf_counter() - start, 2),
            },
        }
        art = writer.commit(manifest)
    log(f"wrote {out}", quiet)
    return art
