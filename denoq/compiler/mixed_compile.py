"""Step-aware mixed precision, compiled: one member artifact per candidate of `precision.mixed` (each a plain
`denoq.compiler.pipeline.compile_model`), then the per-step choice of PTQD's criterion (`denoq.calibrators.stepprec`)
over the members' quantization SNR on the FP trajectories. `denoq.compiler.mixed` reads and runs the result.
Runs under torchrun as `compile_model` does (docs/distributed.md)."""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from denoq.calibrators.stepprec import choose_precision, diffusion_snr, precision_png, quantization_snr
from denoq.compiler.artifact import Artifact
from denoq.compiler.artifact_writer import ArtifactWriter, check_output_dir
from denoq.compiler.backends import make_backend, torch_eps
from denoq.compiler.calibrate import record_pool, resolve_sampler
from denoq.compiler.data_parallel import is_main, on_main, share_folder
from denoq.compiler.load import load_model
from denoq.compiler.mixed import CRITERION, MEMBERS_DIR, SNR_BATCH
from denoq.compiler.pipeline import compile_model
from denoq.compiler.recipe import Recipe, mixed_members
from denoq.sampling import NoiseSchedule

log = logging.getLogger(__name__)


def compile_mixed(model: str | None, recipe: Recipe, out: Path, *, force: bool = False,
                  allow_parity_failure: bool = False) -> Artifact | None:
    """Compile every candidate of `precision.mixed` and the per-step choice into the artifact folder `out`.

    Under a process group (docs/distributed.md) every rank calibrates each member on its shard and rank 0 writes
    it, then sends the member's files to the other ranks; each rank measures the SNRs on its shard, the sums are
    all-reduced, and rank 0 writes the artifact (the others return None)."""
    on_main(lambda: check_output_dir(out, force), "checking the output folder")
    spec = load_model(model, recipe.config.calib.size)
    recipe = resolve_sampler(spec, recipe)
    candidates = mixed_members(recipe)
    with contextlib.ExitStack() as stack:
        writer = stack.enter_context(ArtifactWriter(out, force)) if is_main() else None
        scratch = None if writer else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="denoq-mixed-")))
        arts: dict[str, Artifact] = {}
        for name, member in candidates.items():
            log.info("mixed precision: compiling member %s", name)
            path = writer.path(f"{MEMBERS_DIR}/{name}") if writer else scratch / name
            art = compile_model(model, member, path, allow_parity_failure=allow_parity_failure)
            share_folder(path, f"member {name}'s files")
            arts[name] = art if art is not None else Artifact.open(path)
        start = time.perf_counter()
        pool = record_pool(spec, recipe)
        fp = torch_eps(spec.module)
        graphs = {name: make_backend(a, "ort") for name, a in arts.items()}
        snr_q = quantization_snr(fp, graphs, pool, SNR_BATCH)
        schedule = NoiseSchedule.from_config(spec.scheduler_config)
        snr_f = {t: diffusion_snr(schedule, t) for t in sorted(set(pool.t))}
        bops = {name: int(a.manifest["cost"]["bops_per_call"]) for name, a in arts.items()}
        choice = choose_precision(snr_q, snr_f, bops)
        names = list(candidates)
        per_image = {name: bops[name] * len(pool.t) for name in names}
        per_image["mixed"] = sum(bops[choice[t]] for t in pool.t)
        runs = {name: sum(1 for t in pool.t if choice[t] == name) for name in names}
        top = max(names, key=lambda n: (bops[n], n))
        log.info("mixed precision: %s; BOPs per image ×%.3f of all-%s",
                 ", ".join(f"{n} runs {runs[n]} steps" for n in names), per_image["mixed"] / per_image[top], top)
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
        title = (f"step-aware precision ({recipe['calib.sampler']} {recipe['calib.steps']}): "
                 + ", ".join(f"{n} {runs[n]} steps" for n in names))
        art = on_main(lambda: _commit(writer, manifest, precision_png(snr_q, snr_f, choice, title)),
                      "writing the artifact")
    if art is not None:
        log.info("wrote %s", out)
    return art


def _commit(writer: ArtifactWriter, manifest: dict[str, Any], png: bytes) -> Artifact:
    """Rank 0's last step (the writer's holder): the picture of the choice, then the manifest, committed."""
    writer.path("precision.png").write_bytes(png)
    return writer.commit(manifest)
