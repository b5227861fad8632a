"""Step-aware mixed precision's criterion (denoq.calibrators.stepprec): SNR_Q per step, SNR_F, the choice."""

from __future__ import annotations

import pytest
import torch

from denoq.calibrators.calibset import CalibrationSet
from denoq.calibrators.stepprec import choose_precision, diffusion_snr, precision_png, quantization_snr
from denoq.errors import DenoqError
from denoq.sampling import NoiseSchedule


def test_diffusion_snr_is_alpha_bar_over_one_minus_alpha_bar():
    from diffusers import DDPMScheduler

    config = {"num_train_timesteps": 1000, "beta_schedule": "linear"}
    schedule = NoiseSchedule.from_config(config)
    a = DDPMScheduler.from_config(config).alphas_cumprod.double()  # ᾱ as diffusers computes it (float32)
    for t in (0, 10, 500, 999):
        assert diffusion_snr(schedule, t) == pytest.approx(float(a[t] / (1 - a[t])), rel=1e-5)


def test_quantization_snr_is_the_energy_ratio_per_step_over_all_batches():
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(10, 1, 4, 4, generator=g) for _ in range(2)]
    traj = CalibrationSet(x=xs, t=[900, 100])
    noise = {900: 0.1, 100: 0.5}

    def fp(x, t, cond=None):
        return 2 * x

    def q(x, t, cond=None):  # error = noise[t] · x: SNR_Q = 4 / noise²
        return 2 * x + noise[int(t[0])] * x

    snr = quantization_snr(fp, {"low": q, "same": fp}, traj, batch_size=3)
    assert snr["low"] == pytest.approx({900: 4 / 0.01, 100: 4 / 0.25})
    assert all(v > 1e100 for v in snr["same"].values())  # no error: effectively infinite SNR


def test_choice_takes_the_cheapest_that_reaches_snr_f_else_the_best():
    snr_q = {"a4": {900: 100.0, 500: 100.0, 10: 5.0}, "a8": {900: 400.0, 500: 400.0, 10: 20.0},
             "fp": {900: 1e9, 500: 1e9, 10: 1e9}}
    cost = {"a4": 1.0, "a8": 2.0, "fp": 10.0}
    assert choose_precision(snr_q, {900: 50.0, 500: 200.0, 10: 30.0}, cost) == {900: "a4", 500: "a8", 10: "fp"}
    del snr_q["fp"]
    assert choose_precision(snr_q, {900: 50.0, 500: 200.0, 10: 30.0}, cost)[10] == "a8"  # none passes: best SNR


def test_choice_refuses_missing_costs_or_steps():
    with pytest.raises(DenoqError, match="no cost"):
        choose_precision({"a": {1: 1.0}}, {1: 0.5}, {})
    with pytest.raises(DenoqError, match="timestep 2 was not measured"):
        choose_precision({"a": {1: 1.0}}, {1: 0.5, 2: 0.5}, {"a": 1.0})


def test_picture_is_a_deterministic_png():
    snr_q = {"w4a8": {900: 1e4, 10: 50.0}, "w8a8": {900: 4e4, 10: 200.0}}
    args = (snr_q, {900: 1e-3, 10: 100.0}, {900: "w4a8", 10: "w8a8"}, "choice")
    png = precision_png(*args)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png == precision_png(*args)
