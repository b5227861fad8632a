"""Sampling an artifact: the wiring of a backend name, the artifact's scheduler and its conditioning into
`denoq.sampling.sample`, shared by `denoq sample`, `eval`, `validate`, the Python API and the studies."""

from __future__ import annotations

import torch

from denoq.compiler.artifact import Artifact
from denoq.compiler.backends import EpsFn, artifact_model, guide, guided_backend, sampling_variance
from denoq.compiler.load import ModelSpec, check_label
from denoq.compiler.mixed import is_mixed, mixed_backend, mixed_variance
from denoq.errors import DenoqError
from denoq.sampling import sample, schedule_from_config
from denoq.sampling.flow import FlowSchedule
from denoq.sampling.names import check_sampler_class, check_sampler_for


def eval_cond(spec: ModelSpec, n: int, seed: int) -> torch.Tensor | None:
    """The conditioning of evaluation samples: a stream apart from calibration's (10 000 + seed); for a
    class-conditional model every class in turn (0, 1, …, 0, 1, …), so that the samples cover the digits."""
    if spec.cond_input == "class_labels":
        return torch.arange(n) % int(spec.num_classes)
    return spec.random_cond(n, 10_000 + seed)


def check_own_sampling(art: Artifact) -> None:
    """Refuse, in one line, what denoq's own sampler does not run: a text-to-image artifact (its prompts, guidance
    and VAE decoding live in the diffusers pipeline, which drives the drop-in denoiser) or a scheduler other than
    DDPM/DDIM or flow-matching Euler (`check_sampler_class`)."""
    model = art.manifest["model"]
    if "text" in model:
        raise DenoqError(f"{model['name']} is a text-to-image model: denoq sample / eval / validate run class and "
                         "unconditional models; sample it in its diffusers pipeline with pipe.unet = "
                         "denoq.load(ART) (tools/sd_quality.py measures it)")
    check_sampler_class(art.manifest["scheduler"])


def sample_artifact(eps: EpsFn, art: Artifact, spec_shape: tuple[int, ...], *, sampler: str, steps: int,
                    eta: float, seed: int, n: int, cond: torch.Tensor | None, callback=None,
                    residual_var: torch.Tensor | None = None,
                    desc: str | None = None) -> torch.Tensor:
    """`n` samples of shape `spec_shape` driven by `eps` with the artifact's noise schedule, from the noise of
    `seed`; `desc` labels the progress bar (default: the sampler's name)."""
    check_own_sampling(art)
    check_sampler_for(art.manifest["scheduler"], sampler)
    schedule = schedule_from_config(art.manifest["scheduler"])
    mu = schedule.mu_for(spec_shape, int(art.manifest["model"]["config"].get("patch_size") or 1)) \
        if isinstance(schedule, FlowSchedule) else None
    return sample(eps, schedule, sampler=sampler, steps=steps, eta=eta, shape=(n, *spec_shape),
                  generator=torch.Generator().manual_seed(seed), cond=cond, callback=callback,
                  residual_var=residual_var, desc=desc, mu=mu)


def sampling_backend(art: Artifact, backend: str, sampler: str, steps: int, *, threads: int | None = None,
                     spec: ModelSpec | None = None, guidance: float | None = None
                     ) -> tuple[EpsFn, torch.Tensor | None]:
    """The eps callable of `backend` (guided at `guidance` when given, `guided_backend`) and the VSC variance table
    for sampling `art` with `sampler` / `steps`; both refuse a sampler other than the one PTQD statistics or a
    mixed artifact's per-step choice were made for."""
    if is_mixed(art):
        return (guide(art, backend, mixed_backend(art, backend, sampler, steps, threads=threads, spec=spec),
                      guidance), mixed_variance(art, backend, sampler, steps))
    variance = sampling_variance(art, backend, sampler, steps)  # PTQD: refuses other samplers; VSC table
    return guided_backend(art, backend, guidance, threads=threads, spec=spec), variance


def generate(art: Artifact, backend: str, *, sampler: str, steps: int, eta: float, seed: int, n: int,
             threads: int | None = None, callback=None, label: int | None = None,
             guidance: float | None = None) -> torch.Tensor:
    """`n` samples from `backend` of `art` (model range, [N, C, H, W]); same seed → same noise on every backend.
    `callback(step, t, x_t, out)` sees every step (`denoq.sampling.sample`). A class-conditional model samples
    `label` (every class in turn when None), with classifier-free guidance of scale `guidance` when given."""
    meta = art.manifest["model"]
    check_own_sampling(art)
    if label is not None or guidance is not None:
        check_label(meta, label, guidance)
    spec = artifact_model(art) if backend.startswith("torch") or meta["cond_shape"] is not None else None
    eps, variance = sampling_backend(art, backend, sampler, steps, threads=threads, spec=spec, guidance=guidance)
    cond = eval_cond(spec, n, seed) if spec is not None else None
    if label is not None:
        cond = torch.full((n,), label, dtype=torch.int64)
    return sample_artifact(eps, art, tuple(art.manifest["model"]["sample_shape"]), sampler=sampler, steps=steps,
                           eta=eta, seed=seed, n=n, cond=cond, residual_var=variance,
                           callback=callback)
