"""Flow matching (denoq/sampling/flow.py) against diffusers' FlowMatchEulerDiscreteScheduler: the sigma schedules
(static shift as SD3, dynamic shift by resolution as Flux) and whole sampling loops on the same noise."""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from denoq.errors import DenoqError
from denoq.sampling.flow import FlowSchedule, flow_euler_step, sample_flow

SD3 = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
FLUX = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
        "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
        "max_image_seq_len": 4096}
PLAIN = {"_class_name": "FlowMatchEulerDiscreteScheduler"}


def diffusers_scheduler(cfg: dict) -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler.from_config({k: v for k, v in cfg.items() if not k.startswith("_")})


def velocity(x: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
    """A smooth stand-in for a model: depends on x, on t (float [B]) and on the conditioning."""
    scale = 0.5 + torch.cos(t / 1000.0).reshape(-1, *[1] * (x.dim() - 1))
    return scale * torch.tanh(x.flip(-1)) - 0.3 * x + (0 if cond is None else cond.reshape(-1, 1, 1, 1))


@pytest.mark.parametrize("cfg, mu", [(SD3, None), (PLAIN, None), (FLUX, calculate_shift(1024)),
                                     (FLUX, calculate_shift(4096))])
@pytest.mark.parametrize("steps", [1, 4, 28])
def test_sigmas_and_timesteps_equal_diffusers(cfg, mu, steps):
    ours_t, ours_s = FlowSchedule.from_config(cfg).sigmas(steps, mu)
    ref = diffusers_scheduler(cfg)
    ref.set_timesteps(steps, mu=mu)
    assert ours_t.dtype == torch.float32 and torch.equal(ours_t, ref.timesteps)
    assert torch.equal(ours_s, ref.sigmas) and float(ours_s[-1]) == 0.0 and len(ours_s) == steps + 1


@pytest.mark.parametrize("tokens", [256, 1024, 4096, 6400])
def test_mu_is_the_flux_pipelines_shift(tokens):
    assert FlowSchedule.from_config(FLUX).mu(tokens) == pytest.approx(calculate_shift(tokens), rel=1e-12)


def test_mu_for_derives_the_token_count_as_the_pipelines_do():
    """FluxPipeline: μ of the packed token count; StableDiffusion3Pipeline (use_dynamic_shifting, SD3.5's option):
    of (H / patch) · (W / patch); a static shift: none."""
    flux = FlowSchedule.from_config(FLUX)
    assert flux.mu_for((4096, 64)) == pytest.approx(calculate_shift(4096), rel=1e-12)
    assert flux.mu_for((16, 128, 96), patch=2) == pytest.approx(calculate_shift(64 * 48), rel=1e-12)
    assert FlowSchedule.from_config(SD3).mu_for((16, 128, 128), patch=2) is None


def test_sample_passes_mu_to_the_flow_sampler_and_a_beta_schedule_refuses_it():
    from denoq.sampling import NoiseSchedule, sample

    schedule = FlowSchedule.from_config(FLUX)
    args = dict(steps=3, shape=(1, 2, 4, 4), cond=torch.tensor([0.0]))
    ours = sample(velocity, schedule, sampler="flow-euler", generator=torch.Generator().manual_seed(1), mu=0.7, **args)
    ref = sample_flow(velocity, schedule, generator=torch.Generator().manual_seed(1), mu=0.7, **args)
    assert torch.equal(ours, ref)
    with pytest.raises(DenoqError, match="mu shifts a flow-matching schedule"):
        sample(velocity, NoiseSchedule.from_config({}), sampler="ddim", mu=0.7, **args)


@pytest.mark.parametrize("cfg, tokens", [(SD3, None), (FLUX, 64)])
def test_sampling_equals_the_diffusers_loop_on_the_same_noise(cfg, tokens):
    schedule = FlowSchedule.from_config(cfg)
    mu = None if tokens is None else schedule.mu(tokens)
    cond = torch.tensor([0.1, -0.2, 0.0])
    ours = sample_flow(velocity, schedule, steps=12, shape=(3, 2, 8, 8), generator=torch.Generator().manual_seed(7),
                       cond=cond, mu=mu)
    ref = diffusers_scheduler(cfg)
    ref.set_timesteps(12, mu=mu)
    x = torch.randn((3, 2, 8, 8), generator=torch.Generator().manual_seed(7))
    for t in ref.timesteps:
        x = ref.step(velocity(x, t.expand(3), cond), t, x).prev_sample
    assert torch.equal(ours, x)


def test_the_backend_sees_the_scheduler_timesteps_and_the_callback_each_step():
    schedule = FlowSchedule.from_config(SD3)
    seen = []
    sample_flow(velocity, schedule, steps=5, x_T=torch.zeros(2, 1, 4, 4),
                callback=lambda i, t, x, v: seen.append((i, t.clone())))
    timesteps, _ = schedule.sigmas(5)
    assert [i for i, _ in seen] == list(range(5))
    assert all(torch.equal(t, timesteps[i].expand(2)) for i, t in seen)
    assert seen[0][1][0] == 1000.0 and seen[-1][1].dtype == torch.float32


def test_euler_step_is_one_line_of_arithmetic():
    x, v = torch.ones(2, 3), torch.full((2, 3), 2.0)
    assert torch.equal(flow_euler_step(x, v, 0.75, 0.25), torch.zeros(2, 3))


@pytest.mark.parametrize("cfg, words", [
    ({**SD3, "use_karras_sigmas": True}, "use_karras_sigmas=True is not supported"),
    ({**SD3, "stochastic_sampling": True}, "stochastic_sampling=True"),
    ({**SD3, "invert_sigmas": True}, "invert_sigmas=True"),
    ({**SD3, "shift_terminal": 0.1}, "shift_terminal=0.1"),
    ({**SD3, "time_shift_type": "cosine"}, "time_shift_type='cosine'"),
    ({**SD3, "num_train_timesteps": 0}, "num_train_timesteps=0"),
    ({"_class_name": "DDIMScheduler"}, "is not FlowMatchEulerDiscreteScheduler"),
])
def test_configs_it_does_not_reproduce_are_refused_in_one_line(cfg, words):
    with pytest.raises(DenoqError, match=words.replace("(", r"\(")) as exc:
        FlowSchedule.from_config(cfg)
    assert "\n" not in str(exc.value)


def test_dynamic_shift_without_mu_and_bad_steps_are_refused():
    with pytest.raises(DenoqError, match="give mu"):
        FlowSchedule.from_config(FLUX).sigmas(4)
    with pytest.raises(DenoqError, match="steps=0"):
        FlowSchedule.from_config(SD3).sigmas(0)
    with pytest.raises(DenoqError, match="shape of x_T"):
        sample_flow(velocity, FlowSchedule.from_config(SD3), steps=2)
