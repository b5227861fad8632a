"""Learnable quantizers (AdaRound / LSQ) and their reconstruction: per-step and AccuQuant windows, the O(1)-memory
gradients against plain autograd, export to an exact plan, bad input (denoq.calibrators.learnable, .accuquant)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from denoq.calibrators.accuquant import (
    AccuQuantSettings,
    check_window,
    pool_noise,
    quantized_states,
    reconstruct,
    trajectory_drift,
)
from denoq.calibrators.accuquant_window import (
    Window,
    output_weights,
    run_window,
    sampler_step,
    state_weights,
    states_after,
    window_backward_recompute,
    window_loss,
    window_targets,
)
from denoq.calibrators.calibset import record_trajectories
from denoq.calibrators.learnable import LearnableModel, inverse_rectified_sigmoid, lsq_fake_quantize, rectified_sigmoid
from denoq.calibrators.quantizer import fake_quantize
from denoq.calibrators.simulate import simulate
from denoq.compiler.backends import artifact_plan
from denoq.compiler.load import load_model
from denoq.errors import DenoqError
from denoq.sampling import NoiseSchedule, module_eps


@pytest.fixture(scope="module")
def tiny(tiny_pipeline, tiny_artifact_trt):
    spec = load_model(str(tiny_pipeline))
    return spec, artifact_plan(tiny_artifact_trt), NoiseSchedule.from_config(spec.scheduler_config)


def _inputs(n: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 16, 16, generator=g), torch.tensor([900, 500, 100, 10][:n])


# -- the quantizers ------------------------------------------------------------------------------------------------
def test_rectified_sigmoid_inverts_and_lsq_matches_the_graph_quantizer():
    h = torch.tensor([0.05, 0.3, 0.5, 0.9])
    torch.testing.assert_close(rectified_sigmoid(inverse_rectified_sigmoid(h)), h)
    x = torch.linspace(-3, 3, 101, requires_grad=True)
    s = torch.tensor(0.05, requires_grad=True)
    y = lsq_fake_quantize(x, s, 0, -8, 7)
    assert torch.equal(y, fake_quantize(x.detach(), s.detach(), 0, -8, 7))  # forward bit-exact
    y.sum().backward()
    inside = (x / 0.05 > -8.5) & (x / 0.05 < 7.5)
    assert torch.equal(x.grad, inside.float())  # straight through inside the range, 0 where saturated
    # LSQ's step-size gradient: Σ (round(v) − v) inside, qmin / qmax outside (v = x / s)
    v = x.detach() / 0.05
    expected = torch.where(v <= -8.5, torch.tensor(-8.0), torch.where(v >= 7.5, torch.tensor(7.0), torch.round(v) - v))
    torch.testing.assert_close(s.grad, expected.sum(), rtol=1e-5, atol=1e-4)


def test_untrained_hard_model_exports_the_plan_and_matches_the_simulation_exactly(tiny):
    spec, plan, _ = tiny
    q = LearnableModel(spec.module, plan, init="plan").hard()
    exported = q.export_plan()
    for name, lp in plan.layers.items():
        assert torch.equal(exported.layers[name].weight_int, lp.weight_int), name
        if lp.input is not None:
            assert torch.equal(exported.layers[name].input.scale, lp.input.scale)
    x, t = _inputs()
    with torch.no_grad():
        assert torch.equal(q(x, t), simulate(spec.module, plan)(x, t))
    soft = LearnableModel(spec.module, plan, init="fp")  # AdaRound's init: the soft weights are the FP weights
    layer = next(iter(soft.learnable.values()))
    w = (layer.w_floor + layer.rounding()) * layer.w_scale
    torch.testing.assert_close(w, layer.source.weight.detach(), rtol=0, atol=1e-4 * float(layer.w_scale.max()))


def test_plan_init_starts_at_integers_that_gptq_moved_beyond_the_nearest_two(tiny):
    spec, plan, _ = tiny
    modules = dict(spec.module.named_modules())
    moved = {}
    for name, lp in sorted(plan.layers.items()):  # ⌊w/s⌋ + 2 and ⌊w/s⌋ − 1 on alternate weights, as GPTQ may leave
        floor = torch.floor(modules[name].weight.detach() / lp.expanded_weight_scale())
        shift = torch.where(torch.arange(floor.numel()).reshape(floor.shape) % 2 == 0, 2.0, -1.0)
        qmax = 2 ** (lp.weight_bits - 1) - 1
        moved[name] = dataclasses.replace(lp, weight_int=(floor + shift).clamp(-qmax, qmax).to(torch.int8))
    gptq_like = dataclasses.replace(plan, layers=moved)
    q = LearnableModel(spec.module, gptq_like, init="plan")
    for name, lp in moved.items():
        assert torch.equal(q.export_plan().layers[name].weight_int, lp.weight_int), name
    x, t = _inputs()
    with torch.no_grad():
        assert torch.equal(q.hard()(x, t), simulate(spec.module, gptq_like)(x, t))
    first = sorted(moved)[0]
    with torch.no_grad():
        q.learnable[first].v.neg_()  # the other choice of each pair: one step back towards w
    back = q.export_plan().layers[first].weight_int.int() - moved[first].weight_int.int()
    assert set(back.unique().tolist()) <= {-1, 0, 1} and int((back != 0).sum()) > 0


def test_export_holds_the_learned_integers_and_scales(tiny):
    spec, plan, _ = tiny
    q = LearnableModel(spec.module, plan, init="plan")
    name, layer = sorted(q.learnable.items())[0]
    with torch.no_grad():
        layer.v.neg_()  # flip every rounding decision
        if layer.log_scale is not None:
            layer.log_scale.fill_(0.1)
    lp = q.export_plan().layers[name]
    flipped = layer.w_floor + (plan.layers[name].weight_int.float() <= layer.w_floor).float()
    assert torch.equal(lp.weight_int, flipped.clamp(-layer.qmax, layer.qmax).to(torch.int8))
    if lp.input is not None:
        torch.testing.assert_close(lp.input.scale, plan.layers[name].input.scale * torch.exp(torch.tensor(0.1)))
    x, t = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(q.hard()(x, t), simulate(spec.module, q.export_plan())(x, t), rtol=0, atol=0)


# -- the window's gradients ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("sampler, eta, objective", [("ddim", 0.0, "end"), ("ddim", 1.0, "end"), ("ddpm", 0.0, "end"),
                                                     ("ddim", 0.0, "every"), ("ddpm", 0.0, "every"),
                                                     ("ddim", 0.0, "outputs"), ("ddpm", 0.0, "outputs")])
def test_recompute_gradients_equal_autograd_through_the_stopped_and_the_full_objective(tiny, sampler, eta,
                                                                                      objective):
    spec, plan, schedule = tiny
    q = LearnableModel(spec.module, plan, init="fp")
    q_eps, step = module_eps(q), sampler_step(schedule, sampler, eta)
    ts = schedule.timesteps(10, sampler).tolist()
    prev = schedule.prev_timesteps(10, sampler).tolist()
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(3, 1, 16, 16, generator=g)
    window = Window(x0, [(ts[k], prev[k]) for k in range(6, 10)], [torch.randn(x0.shape, generator=g)
                                                                   for _ in range(4)])
    targets = window_targets(module_eps(spec.module), window, step, objective)
    params = [p for p in q.parameters() if p.requires_grad]
    reference = torch.autograd.grad(window_loss(q_eps, window, step, targets), params)
    value = window_backward_recompute(q_eps, window, step, targets)
    assert value == pytest.approx(float(window_loss(q_eps, window, step, targets).detach()), rel=1e-6)
    got, ref = torch.cat([p.grad.flatten() for p in params]), torch.cat([r.flatten() for r in reference])
    assert float(ref.abs().max()) > 0
    assert float((got - ref).norm() / ref.norm()) < 1e-5  # float32 sums in another order, nothing more
    torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-6 * float(ref.abs().max()))
    naive = torch.autograd.grad(window_loss(q_eps, window, step, targets, stop_gradient=False), params)
    assert any(not torch.allclose(a, b, rtol=1e-3) for a, b in zip(naive, reference, strict=True))
    for p in params:  # the adjoint through the model's inputs: the naive variant's exact gradient in O(1) graphs
        p.grad = None
    assert window_backward_recompute(q_eps, window, step, targets, through_inputs=True) == value
    got, ref = torch.cat([p.grad.flatten() for p in params]), torch.cat([r.flatten() for r in naive])
    assert float((got - ref).norm() / ref.norm()) < 1e-5
    torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-6 * float(ref.abs().max()))


# -- reconstruction ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pool(tiny):
    spec, _, schedule = tiny
    return record_trajectories(module_eps(spec.module), schedule, sampler="ddim", steps=8, n_samples=8,
                               sample_shape=spec.sample_shape, seed=0)


def test_weights_of_the_end_every_and_outputs_objectives():
    assert state_weights("end", [1.0, 2.0, 3.0]) == [0.0, 0.0, pytest.approx(1 / 6)]
    assert state_weights("every", [1.0, 2.0, 3.0]) == [pytest.approx(1 / 10)] * 3  # 1 + (1 + 2) + (1 + 2 + 3)
    assert state_weights("every", [4.0]) == state_weights("end", [4.0]) == [0.25]  # n = 1: the per-step loss
    assert output_weights("outputs", 10.0, 2) == [pytest.approx(1 / 10)] * 2  # Σ‖ε_k‖² = 10 over 2 steps
    assert state_weights("outputs", [2, 8]) == [0, 0]
    assert output_weights("end", 10.0, 2) == output_weights("every", 10.0, 2) == [0.0, 0.0]


def test_one_step_window_of_outputs_is_the_per_step_loss_and_longer_ones_see_the_drift(tiny, pool):
    spec, plan, schedule = tiny
    q_eps, fp = module_eps(LearnableModel(spec.module, plan, init="plan").hard()), module_eps(spec.module)
    step = sampler_step(schedule, "ddim")
    prev = dict(zip(pool.t, schedule.prev_timesteps(8, "ddim").tolist(), strict=True))
    x = pool.x[3][:4]
    t = torch.full((4,), pool.t[3], dtype=torch.int64)
    with torch.no_grad():
        per_step = float((q_eps(x, t, None) - fp(x, t, None)).pow(2).sum() / fp(x, t, None).pow(2).sum())
    pairs = [(pool.t[k], prev[pool.t[k]]) for k in (3, 4)]
    noise = [torch.zeros_like(x)] * 2
    one = Window(x, pairs[:1], noise[:1])
    loss = window_loss(q_eps, one, step, window_targets(fp, one, step, "outputs")).detach()
    assert float(loss) == pytest.approx(per_step, rel=1e-5)
    two = Window(x, pairs, noise)
    targets = window_targets(fp, two, step, "outputs")
    end, xs, outs = run_window(q_eps, two, step)  # the second output is the quantized model's at its drifted state
    assert not torch.equal(xs[1], targets.states[0]) and targets.value(states_after(end, xs), outs) == pytest.approx(
        float(window_loss(q_eps, two, step, targets).detach()), rel=1e-5)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_stopped_outputs_gradient_is_each_step_s_own_error_at_the_quantized_run_s_input(tiny, sampler):
    # the default objective and gradient: λ stays 0, so the gradient is that of Σ_k u_k ‖ε_q(x^q_k) − ε_k‖² with the
    # quantized run's latents x^q_k held fixed; the drift reaches the loss through the inputs, never the gradient
    spec, plan, schedule = tiny
    q = LearnableModel(spec.module, plan, init="fp")
    q_eps, step = module_eps(q), sampler_step(schedule, sampler)
    ts, prev = schedule.timesteps(10, sampler).tolist(), schedule.prev_timesteps(10, sampler).tolist()
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(3, 1, 16, 16, generator=g)
    window = Window(x0, [(ts[k], prev[k]) for k in range(5, 8)], [torch.randn(x0.shape, generator=g)
                                                                  for _ in range(3)])
    targets = window_targets(module_eps(spec.module), window, step, "outputs")
    _, q_xs, _ = run_window(q_eps, window, step)
    params = [p for p in q.parameters() if p.requires_grad]
    independent = sum(u * (q_eps(x, window.t(k), None) - ref).pow(2).sum()
                      for k, (u, x, ref) in enumerate(zip(targets.output_weights, q_xs, targets.outputs, strict=True)))
    reference = torch.cat([r.flatten() for r in torch.autograd.grad(independent, params)])
    window_backward_recompute(q_eps, window, step, targets)
    got = torch.cat([p.grad.flatten() for p in params])
    assert not torch.equal(q_xs[1], targets.states[0])  # the second step's input drifted
    assert float((got - reference).norm() / reference.norm()) < 1e-5


@pytest.mark.parametrize("window, objective, words", [(0, "end", "per-step"), (3, "end", "window of 3 steps"),
                                                      (3, "every", "window of 3 steps, every state")])
def test_reconstruction_returns_a_hard_plan_and_reports(tiny, pool, window, objective, words):
    spec, plan, schedule = tiny
    settings = AccuQuantSettings(window=window, iters=6, batch=4, lr=0.05, warmup=0.5, init="fp", objective=objective)
    learned, info = reconstruct(spec.module, plan, pool, schedule, "ddim", 8, settings)
    assert info["iters"] == 6 and info["stopped"] is None and len(info["loss_curve"]) == 6
    assert info["objective"] == words
    changed = sum(int((learned.layers[n].weight_int != lp.weight_int).sum()) for n, lp in plan.layers.items())
    assert changed > 0  # the rounding moved
    for lp in learned.layers.values():
        assert lp.weight_int.dtype == torch.int8 and int(lp.weight_int.abs().max()) <= 127
    x, t = _inputs()
    with torch.no_grad():
        assert torch.isfinite(simulate(spec.module, learned)(x, t)).all()


def test_window_fine_tune_starts_with_the_per_step_objective(tiny, pool):
    spec, plan, schedule = tiny
    common = {"iters": 6, "batch": 4, "lr": 0.05, "warmup": 0.5, "init": "fp"}
    _, per_step = reconstruct(spec.module, plan, pool, schedule, "ddim", 8, AccuQuantSettings(window=0, **common))
    _, tuned = reconstruct(spec.module, plan, pool, schedule, "ddim", 8,
                           AccuQuantSettings(window=3, perstep_iters=3, **common))
    assert tuned["objective"] == "per-step for 3 iterations, then window of 3 steps, model outputs"
    assert tuned["loss_curve"][:3] == per_step["loss_curve"][:3]  # same draws, same objective
    assert tuned["loss_curve"][3] != per_step["loss_curve"][3]  # the window takes over


def test_full_gradient_trains_alike_in_o1_and_in_one_graph_and_unlike_the_stopped_one(tiny, pool):
    spec, plan, schedule = tiny
    # objective "end": recompute and naive then sum the same terms in the same order (bit-equal gradients), so the
    # optimizer paths can be compared; under "outputs" the output term joins λ's gradient in another order and the
    # ~1e-7 differences (tested against autograd above) can move a rounding variable across its clamp
    common = {"window": 3, "iters": 4, "batch": 4, "lr": 0.05, "warmup": 0.5, "init": "fp", "objective": "end"}
    runs = {(backprop, gradient): reconstruct(spec.module, plan, pool, schedule, "ddim", 8, AccuQuantSettings(
        backprop=backprop, gradient=gradient, **common))[1]
        for backprop in ("recompute", "naive") for gradient in ("stop", "full")}
    assert runs["recompute", "full"]["gradient"] == "full"
    for gradient in ("stop", "full"):  # the same gradients, so the same optimizer path
        assert runs["recompute", gradient]["loss_curve"] == pytest.approx(runs["naive", gradient]["loss_curve"],
                                                                          rel=1e-3)
    full, stop = runs["recompute", "full"]["loss_curve"], runs["recompute", "stop"]["loss_curve"]
    assert full[0] == pytest.approx(stop[0], rel=1e-6) and full[1:] != pytest.approx(stop[1:], rel=1e-4)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_quantized_trajectories_rerun_the_pool_with_its_own_noise(tiny, sampler):
    spec, plan, schedule = tiny
    fp = module_eps(spec.module)
    pool = record_trajectories(fp, schedule, sampler=sampler, steps=8, n_samples=4, sample_shape=spec.sample_shape,
                               seed=1)
    prev = dict(zip(schedule.timesteps(8, sampler).tolist(), schedule.prev_timesteps(8, sampler).tolist(),
                    strict=True))
    step = sampler_step(schedule, sampler)
    zs = pool_noise(fp, pool, step, prev)
    assert len(zs) == 7 and (float(zs[2].std()) > 0.5 if sampler == "ddpm" else not zs[2].any())
    again = quantized_states(fp, pool, step, prev, zs)  # the FP model re-runs its own trajectories
    for got, ref in zip(again, pool.x, strict=True):
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)
    assert trajectory_drift(again, pool) < 1e-5
    quantized = quantized_states(module_eps(simulate(spec.module, plan)), pool, step, prev, zs)
    assert trajectory_drift(quantized, pool) > 1e-3  # the quantized model walks off the FP trajectories


@pytest.mark.parametrize("window", [0, 2])
def test_reconstruction_from_the_quantized_trajectories(tiny, pool, window):
    spec, plan, schedule = tiny
    common = {"window": window, "iters": 6, "batch": 4, "lr": 0.05, "warmup": 0.5}
    _, fp_start = reconstruct(spec.module, plan, pool, schedule, "ddim", 8, AccuQuantSettings(**common))
    learned, info = reconstruct(spec.module, plan, pool, schedule, "ddim", 8,
                                AccuQuantSettings(start="quantized", **common))
    assert info["start"] == "quantized" and info["objective"].endswith(", from the quantized trajectories")
    drift = info["trajectory_drift"]  # at the start (the plan) and after the hard rounding
    assert len(drift) == 2 and drift[0] > 0 and all(d >= 0 for d in drift)
    assert info["loss_curve"] != pytest.approx(fp_start["loss_curve"], rel=1e-3)  # other starts, other losses
    assert "trajectory_drift" not in fp_start and fp_start["start"] == "fp"
    x, t = _inputs()
    with torch.no_grad():
        assert torch.isfinite(simulate(spec.module, learned)(x, t)).all()


def test_divergence_stops_and_keeps_the_last_good_quantizers(tiny, pool):
    spec, plan, schedule = tiny
    settings = AccuQuantSettings(window=2, iters=20, batch=4, lr=1e12)
    learned, info = reconstruct(spec.module, plan, pool, schedule, "ddim", 8, settings)
    assert info["stopped"] is not None and "non-finite" in info["stopped"] and "lower accuquant.lr" in info["stopped"]
    assert info["iters"] < 20
    for lp in learned.layers.values():
        if lp.input is not None:
            assert torch.isfinite(lp.input.scale).all() and (lp.input.scale > 0).all()
    x, t = _inputs()
    with torch.no_grad():
        assert torch.isfinite(simulate(spec.module, learned)(x, t)).all()


def test_bad_windows_and_settings_are_refused(tiny, pool):
    spec, plan, schedule = tiny
    with pytest.raises(DenoqError, match=r"accuquant\.window=9 needs 9 consecutive sampler steps but the "
                                         r"calibration records calib\.steps=8"):
        check_window(9, 8)
    with pytest.raises(DenoqError, match="needs every step of ddim 10"):
        reconstruct(spec.module, plan, pool, schedule, "ddim", 10, AccuQuantSettings(window=2, iters=1))
    with pytest.raises(DenoqError, match="out of range"):
        AccuQuantSettings(window=2, iters=0)
    with pytest.raises(DenoqError, match=r"perstep_iters=5 leaves no iteration of the 2-step window"):
        AccuQuantSettings(window=2, iters=5, perstep_iters=5)
    with pytest.raises(DenoqError, match=r"objective 'middle' is unknown: choose one of end, every"):
        AccuQuantSettings(window=2, objective="middle")
    with pytest.raises(DenoqError, match=r"gradient 'half' is unknown: choose one of full, stop"):
        AccuQuantSettings(window=2, gradient="half")
    with pytest.raises(DenoqError, match=r"start 'noise' is unknown: choose one of fp, quantized"):
        AccuQuantSettings(window=2, start="noise")


# -- in the compiler -----------------------------------------------------------------------------------------------
def test_compile_with_an_accuquant_window(tiny_pipeline, tmp_path):
    from test_parity import end_to_end_rms

    from denoq.compiler.pipeline import compile_model
    from denoq.compiler.recipe import load_recipe

    recipe = load_recipe("w4a8", ["calib.samples=8", "calib.steps=6", "weights.method=adaround",
                                  "accuquant.window=2", "accuquant.iters=4", "accuquant.batch=4",
                                  "accuquant.init=gptq", "accuquant.granularity=network"])
    art = compile_model(str(tiny_pipeline), recipe, tmp_path / "a")
    info = art.manifest["calibration"]["accuquant"]
    assert info["objective"] == "window of 2 steps, model outputs" and info["init"] == "plan" and info["iters"] == 4
    assert art.manifest["calibration"]["weights"]["method"] == "gptq"  # the rounding it started from
    quant_error, op_by_op, _ = end_to_end_rms(art)
    assert quant_error > 0 and op_by_op < 0.6 * quant_error  # the exported plan runs in ORT as simulated
    from denoq.compiler.cli import main

    assert main(["eval", str(art.path), "--steps", "6", "--n", "4", "--threads", "1"]) == 0
    report = json.loads((art.path / "report.json").read_text())
    assert report["calibration"]["accuquant"]["window"] == 2
    assert "learned (AdaRound + LSQ, window of 2 steps, model outputs, 4 iterations)" in report["calibration"]["text"]


@pytest.mark.parametrize("sets, message", [
    (["weights.method=adaround", "accuquant.window=7", "calib.steps=6"],
     "accuquant.window=7 needs 7 consecutive sampler steps"),
    (["accuquant.window=2"], "add --set weights.method=adaround"),
])
def test_cli_refuses_bad_windows_and_writes_nothing(tiny_pipeline, tmp_path, capsys, sets, message):
    from test_cli import assert_nothing_written, run_error

    argv = ["compile", str(tiny_pipeline), "--recipe", "w8a8", "--out", str(tmp_path / "a")]
    for item in ["calib.samples=4", *sets]:
        argv += ["--set", item]
    assert message in run_error(capsys, argv)
    assert_nothing_written(tmp_path, "a")


def test_recipe_defaults_are_the_reconstruction_settings_defaults():
    """The recipe's accuquant.* defaults and AccuQuantSettings' own (which tools/accuquant_memory.py uses) are one
    choice: a default changed in one place only fails here."""
    from denoq.compiler.calibrate import accuquant_settings
    from denoq.compiler.recipe import load_recipe

    recipe = load_recipe("w8a8", ["weights.method=adaround", "seed=3"])
    assert accuquant_settings(recipe) == AccuQuantSettings(window=0, seed=3)
    picked = accuquant_settings(load_recipe("w4a8", ["weights.method=adaround", "accuquant.window=4",
                                                      "accuquant.init=fp", "accuquant.gradient=full"]))
    assert (picked.window, picked.init, picked.gradient) == (4, "fp", "full")
