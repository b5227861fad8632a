"""Block-wise offloading (`calib.offload=disk`, `denoq.calibrators.offload`): one block's weights in memory at a
time during a forward pass, the model restored afterwards, and the same plan as calibrating in memory."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from denoq.calibrators.attention import QuantAttnProcessor
from denoq.calibrators.offload import BlockOffload, offload_units, offloaded, resident
from denoq.calibrators.simulate import simulate, simulated_in_place
from denoq.compiler.calibrate import calibrate
from denoq.compiler.load import load_model
from denoq.compiler.recipe import load_recipe
from denoq.errors import DenoqError
from denoq.sampling.cond import call_denoiser

SMALL = ["calib.samples=8", "calib.steps=4", "seed=3"]


def _loaded(model: torch.nn.Module) -> set[str]:
    return {name for name, unit in offload_units(model).items()
            if any(p.device.type != "meta" for p in unit.parameters())}


def test_a_forward_pass_holds_one_block_and_the_model_comes_back(tmp_path):
    spec = load_model("digits")
    model = spec.module
    before = {k: v.clone() for k, v in model.state_dict().items()}
    units = offload_units(model)
    assert {"conv_in", "time_embedding", "down_blocks.0.resnets.0", "mid_block.resnets.1", "conv_out"} <= set(units)
    assert not any(u in units for u in ("down_blocks.0", "mid_block", "up_blocks.1"))  # split into their pieces
    seen: list[set[str]] = []
    probes = [m.register_forward_pre_hook(lambda _m, _a: seen.append(_loaded(model)))
              for name, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    x = torch.randn(2, *spec.sample_shape)
    with torch.no_grad():
        want = model(x, torch.tensor([10, 500])).sample
        with BlockOffload(model, tmp_path) as store:
            assert _loaded(model) == set()
            got = model(x, torch.tensor([10, 500])).sample
            assert store.loads >= len(units)
            with resident(model, ["down_blocks.1.resnets.0.conv1"]):
                assert _loaded(model) == {"down_blocks.1.resnets.0"}
    for h in probes:
        h.remove()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # loaded weights: other alignment, rounding
    assert seen and max(len(s) for s in seen[len(seen) // 2:]) == 1  # the offloaded pass: one block at a time
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_layer_called_from_outside_its_block_loads_it(tmp_path):
    """DiT's head calls the first transformer block's timestep embedder itself, outside the block's own call."""
    spec = load_model("digits-dit")
    x, t, y = torch.randn(2, *spec.sample_shape), torch.tensor([3, 900]), torch.tensor([1, 7])
    with torch.no_grad():
        want = call_denoiser(spec.module, x, t, y)
        with offloaded(spec.module, "disk"):
            got = call_denoiser(spec.module, x, t, y)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # loaded weights: other alignment, rounding


def test_the_twin_in_place_computes_the_copy_and_leaves_the_fp_calls_fp():
    """`simulated_in_place` on the model's own modules, offloaded or not: the twin's output is the deep-copied
    simulation's, the model's own calls in between stay FP, and the model's forwards and processors come back."""
    spec = load_model("digits-sd")
    cal = calibrate(spec, load_recipe("w8a8", [*SMALL, "activations.timestep_groups=3", "attention.quantize=true"]))
    assert cal.plan.attention and cal.info["timestep_groups"]
    x, t, cond = next(cal.calib.batches(4))
    processors = {n: type(m.processor) for n, m in spec.module.named_modules() if hasattr(m, "processor")}
    with torch.no_grad():
        fp = call_denoiser(spec.module, x, t, cond)
        copied = call_denoiser(simulate(spec.module, cal.plan), x, t, cond)
        assert not torch.allclose(copied, fp, rtol=1e-3, atol=1e-3)
        for mode in ("none", "disk"):
            with offloaded(spec.module, mode), simulated_in_place(spec.module, cal.plan) as twin:
                got = call_denoiser(twin, x, t, cond)
                fp_inside = call_denoiser(spec.module, x, t, cond)
            torch.testing.assert_close(got, copied, rtol=1e-5, atol=1e-5, msg=mode)
            torch.testing.assert_close(fp_inside, fp, rtol=1e-5, atol=1e-5, msg=mode)
    assert not any("forward" in vars(m) for m in spec.module.modules())
    assert {n: type(m.processor) for n, m in spec.module.named_modules() if hasattr(m, "processor")} == processors
    assert QuantAttnProcessor not in processors.values()
    # a layer the simulation refuses, after others were switched: the model gets every forward back
    grouped = next(n for n in reversed(sorted(cal.plan.layers)) if not cal.plan.layers[n].input.is_constant)
    bad = dataclasses.replace(cal.plan, layers={**cal.plan.layers, grouped: dataclasses.replace(
        cal.plan.layers[grouped], input_factors=torch.ones(1))})
    with pytest.raises(DenoqError, match="IGQ groups or SVDQuant and timestep groups"), simulated_in_place(
            spec.module, bad):
        pass
    assert not any("forward" in vars(m) for m in spec.module.modules())


def _calibrate(model: str, recipe: str, sets: list[str]) -> tuple[dict[str, torch.Tensor], dict]:
    """The plan's tensors and PTQD's (where enabled), and the calibration's info."""
    spec = load_model(model)
    cal = calibrate(spec, load_recipe(recipe, [*SMALL, *sets]))
    return {**cal.plan.tensors(), **({} if cal.ptqd is None else cal.ptqd.to_tensors())}, cal.info


def _plan_tensors(model: str, recipe: str, sets: list[str]) -> dict[str, torch.Tensor]:
    return _calibrate(model, recipe, sets)[0]


@pytest.mark.parametrize(("model", "recipe", "sets"), [
    ("digits", "w8a8", ["activations.timestep_groups=3"]),
    ("digits-dit", "w4a8-fast", []),              # sequential GPTQ over the substituted, rounded prefix
    ("digits-sd", "w8a8", ["attention.quantize=true"]),
    ("digits-dit", "w8a8", ["activations.igq_groups=4", "activations.igq_budget=1.15", "attention.quantize=true"]),
    ("digits-dit", "w8a8", ["activations.igq_groups=4", "activations.igq_mode=static"]),  # weights re-rounded
    ("digits", "w4a8-fast", ["ptqd.enabled=true"]),   # the quantized twin shares the offloaded modules
    ("digits-dit", "w4a8", ["accuquant.iters=4", "accuquant.block_inputs=16"]),  # one block's learnables at a time
    ("digits-sd", "w8a8", ["activations.timestep_groups=3", "attention.quantize=true", "ptqd.enabled=true"]),
])
def test_offloaded_calibration_gives_the_in_memory_plan(model, recipe, sets):
    memory = _plan_tensors(model, recipe, sets)
    disk, info = _calibrate(model, recipe, [*sets, "calib.offload=disk"])
    # every unit is read back from the model's own safetensors file, none copied to the scratch folder
    assert info["offload"]["from_checkpoint"] == info["offload"]["units"] > 5
    _assert_same_plan(memory, disk)


def _assert_same_plan(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Integers identical but for a rare float-rounding tie, scales equal to float rounding: a loaded weight sits
    at another memory alignment than the model's own, and the kernels may then add in another order."""
    assert a.keys() == b.keys()
    ints = [k for k in a if not a[k].dtype.is_floating_point]
    assert sum(int((a[k] != b[k]).sum()) for k in ints) <= 1e-4 * sum(a[k].numel() for k in ints)
    for k in a:
        if a[k].dtype.is_floating_point:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=0, msg=k)


def test_sequential_gptq_stopping_after_each_block_changes_nothing(monkeypatch):
    """The Hessian pass of a block ends when the block returns, except where a layer of it is called again later
    (DiT's first block): the plan equals running every pass to the end."""
    import denoq.calibrators.weights as weights

    stopped = _plan_tensors("digits-dit", "w4a8-fast", [])
    monkeypatch.setattr(weights, "_ends", lambda _model, blocks, _calib: dict.fromkeys(blocks))
    full = _plan_tensors("digits-dit", "w4a8-fast", [])
    assert all(torch.equal(stopped[k], full[k]) for k in full)


def test_methods_that_need_the_whole_model_are_refused():
    with pytest.raises(DenoqError, match=r"calib.offload=disk .* svdquant need the whole model in memory"):
        load_recipe("w4a8-fast", ["calib.offload=disk", "svdquant.rank=4"])
    with pytest.raises(DenoqError, match=r"adaround over the network or sampler windows need the whole model"):
        load_recipe("w4a8", ["calib.offload=disk", "accuquant.granularity=network"])


def test_units_not_in_the_checkpoint_are_written_to_the_scratch_folder(tmp_path):
    """A unit is read back from the checkpoint only where the checkpoint holds it as the model does: here
    conv_in is missing from a partial checkpoint and the time embedding differs from the model's."""
    from safetensors.torch import save_file

    spec = load_model("digits")
    state = {k: v.clone() for k, v in spec.module.state_dict().items() if not k.startswith("conv_in.")}
    state["time_embedding.linear_1.weight"] += 1
    save_file(state, str(tmp_path / "partial.safetensors"))
    x, t = torch.randn(1, *spec.sample_shape), torch.tensor([100])
    with torch.no_grad():
        want = spec.module(x, t).sample
        with BlockOffload(spec.module, tmp_path / "scratch", [tmp_path / "partial.safetensors"]) as store:
            got = spec.module(x, t).sample
    written = sorted(p.stem for p in (tmp_path / "scratch").iterdir())
    assert written == ["conv_in", "time_embedding"]
    assert store.summary()["from_checkpoint"] == len(store.units) - 2
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # other memory alignment: other float rounding
