"""Block-wise reconstruction (denoq.calibrators.blockrecon, accuquant.granularity=block): the cached block
arguments replay the block as the whole model runs it, the staged model, the loop over the blocks, bad input."""

from __future__ import annotations

import contextlib

import pytest
import torch

from denoq.calibrators.accuquant import AccuQuantSettings, reconstruct
from denoq.calibrators.blockrecon import Batched, block_loss, cache_block, sample_inputs
from denoq.calibrators.calibset import record_trajectories
from denoq.calibrators.learnable import LearnableModel, staged_twin
from denoq.calibrators.simulate import simulate
from denoq.calibrators.weights import blocks_in_order
from denoq.compiler.backends import artifact_plan
from denoq.compiler.load import load_model
from denoq.errors import DenoqError
from denoq.sampling import NoiseSchedule, module_eps


@pytest.fixture(scope="module")
def tiny(tiny_pipeline, tiny_artifact_trt):
    spec = load_model(str(tiny_pipeline))
    return spec, artifact_plan(tiny_artifact_trt), NoiseSchedule.from_config(spec.scheduler_config)


@pytest.fixture(scope="module")
def pool(tiny):
    spec, _, schedule = tiny
    return record_trajectories(module_eps(spec.module), schedule, sampler="ddim", steps=8, n_samples=8,
                               sample_shape=spec.sample_shape, seed=0)


def _blocks(spec, plan, pool) -> dict[str, list[str]]:
    return blocks_in_order(spec.module, {n: spec.module.get_submodule(n) for n in plan.layers}, pool)


def test_batched_concatenates_the_batch_leaves_and_keeps_the_others():
    g = torch.Generator().manual_seed(0)
    parts = [((torch.randn(n, 3, generator=g), (torch.randn(n, 2, generator=g),), None, 7),
              {"temb": torch.randn(n, 4, generator=g), "scale": torch.ones(5)}) for n in (2, 3)]
    b = Batched.gather(parts, [2, 3])
    (x, (res,), none, seven), kw = b.rows(torch.tensor([4, 0]))
    assert torch.equal(x, torch.cat([parts[1][0][0][2:3], parts[0][0][0][0:1]]))
    assert torch.equal(res[0], parts[1][0][1][0][2]) and torch.equal(kw["temb"][1], parts[0][1]["temb"][0])
    assert none is None and seven == 7 and torch.equal(kw["scale"], torch.ones(5))  # not per input: kept whole
    assert len(b.tensors()) == 3
    parts[1][1]["scale"] = torch.zeros(5)
    with pytest.raises(DenoqError, match="changes across calibration batches"):
        Batched.gather(parts, [2, 3])


@contextlib.contextmanager
def _staged(kind: str, model: torch.nn.Module, plan):
    """The staged quantized model: a learnable copy, or the twin on the model's own modules (which must give the
    model back as it was: its forwards and its parameters' requires_grad)."""
    if kind == "copy":
        yield LearnableModel(model, plan).train()
        return
    flags = [p.requires_grad for p in model.parameters()]
    with staged_twin(model, plan) as q:
        assert not any(p.requires_grad for p in model.parameters())
        yield q
    assert not any("forward" in vars(m) for m in model.modules())
    assert [p.requires_grad for p in model.parameters()] == flags


@pytest.mark.parametrize("kind", ["copy", "twin"])
def test_staged_model_runs_later_blocks_in_floating_point(tiny, pool, kind):
    spec, plan, _ = tiny
    x, t = pool.x[3][:4], torch.full((4,), pool.t[3], dtype=torch.int64)
    blocks = list(_blocks(spec, plan, pool).values())
    with _staged(kind, spec.module, plan) as q, torch.no_grad():
        fp = spec.module(x, t).sample
        torch.testing.assert_close(q.hard()(x, t), simulate(spec.module, plan)(x, t), rtol=1e-5, atol=1e-6)
        assert torch.equal(q.stage([], [])(x, t), fp)  # nothing quantized: the FP model exactly
        with torch.enable_grad():
            q.stage(blocks[0], blocks[1])
            q(x, t).pow(2).sum().backward()
        grads = {n for n, m in q.learnable.items() if m.v.grad is not None}
        assert grads == set(blocks[1])  # the hard block before and the FP blocks after take no gradient
        if kind == "twin":  # only the learning block holds rounding variables
            assert set(q.learnable) == set(blocks[1])
            assert set(q.shared) == set(blocks[0]) | set(blocks[1])


@pytest.mark.parametrize("kind", ["copy", "twin"])
def test_cached_block_loss_is_the_block_error_of_the_whole_models(tiny, pool, kind):
    """The block replayed on its cached arguments (clock at their rows) gives what hooks on the whole quantized
    and FP models see at that block."""
    spec, plan, _ = tiny
    blocks = _blocks(spec, plan, pool)
    names = list(blocks)
    block = next(b for b in names[1:] if b.startswith(("down_blocks", "mid_block", "up_blocks")))
    done = [n for b in names[:names.index(block)] for n in blocks[b]]
    inputs = sample_inputs(pool, 12, seed=1)
    assert len(set(inputs)) == 12 and inputs == sorted(inputs)
    outs: dict[str, list[torch.Tensor]] = {"q": [], "fp": []}

    def keep(key):
        def hook(_m, _a, out):
            outs[key] += [o for o in (out if isinstance(out, tuple) else (out,))
                          for o in (o if isinstance(o, tuple) else (o,))]
        return hook

    x = torch.stack([pool.x[s][r] for s, r in inputs])
    t = torch.tensor([pool.t[s] for s, _ in inputs])
    with _staged(kind, spec.module, plan) as q:
        q.stage(done, blocks[block])
        data = cache_block(module_eps(q), q.model.get_submodule(block), module_eps(spec.module),
                           spec.module.get_submodule(block), pool, inputs, plan.num_train_timesteps)
        with torch.no_grad():
            got = float(block_loss(q.model.get_submodule(block), data, torch.arange(12), q.clock))
            for key, run, model in (("q", q, q.model), ("fp", spec.module, spec.module)):
                handle = model.get_submodule(block).register_forward_hook(keep(key))
                run(x, t)
                handle.remove()
    err = sum(float((a - b).pow(2).sum()) for a, b in zip(outs["q"], outs["fp"], strict=True))
    energy = sum(float(b.pow(2).sum()) for b in outs["fp"])
    assert got == pytest.approx(err / energy, rel=1e-4) and got > 0


@pytest.mark.parametrize("window, words", [(0, "each block's output (BRECQ)"), (1, "per-step"),
                                           (2, "window of 2 steps, model outputs")])
def test_block_reconstruction_learns_each_block_in_forward_order(tiny, pool, window, words):
    spec, plan, schedule = tiny
    settings = AccuQuantSettings(window=window, iters=3, batch=4, lr=0.05, warmup=0.0, granularity="block",
                                 block_inputs=16, init="fp")
    learned, info = reconstruct(spec.module, plan, pool, schedule, "ddim", 8, settings)
    blocks = _blocks(spec, plan, pool)
    assert info["granularity"] == "block" and info["objective"] == words and info["stopped"] is None
    assert [b["block"] for b in info["blocks"]] == list(blocks) and info["iters"] == 3 * len(blocks)
    assert all(b["iters"] == 3 and b["layers"] == len(blocks[b["block"]]) for b in info["blocks"])
    assert sum(int((learned.layers[n].weight_int != lp.weight_int).sum()) for n, lp in plan.layers.items()) > 0


def test_block_granularity_refuses_what_it_does_not_implement():
    with pytest.raises(DenoqError, match=r"start=quantized .* not implemented with accuquant.granularity=block"):
        AccuQuantSettings(window=2, granularity="block", start="quantized")
    with pytest.raises(DenoqError, match="granularity 'layer' is unknown: choose one of network, block"):
        AccuQuantSettings(window=0, granularity="layer")
    with pytest.raises(DenoqError, match="block_inputs=0 must be ≥ 1"):
        AccuQuantSettings(window=0, granularity="block", block_inputs=0)


def test_w4a8_preset_compiles_block_by_block_and_runs_in_ort_as_simulated(tiny_pipeline, tmp_path):
    from test_parity import end_to_end_rms

    from denoq.compiler.pipeline import compile_model
    from denoq.compiler.recipe import load_recipe

    recipe = load_recipe("w4a8", ["calib.samples=8", "calib.steps=6", "accuquant.iters=3", "accuquant.batch=4",
                                  "accuquant.block_inputs=16"])
    art = compile_model(str(tiny_pipeline), recipe, tmp_path / "a")
    info = art.manifest["calibration"]["accuquant"]
    assert info["granularity"] == "block" and info["objective"] == "each block's output (BRECQ)"
    assert art.manifest["calibration"]["weights"]["method"] == "gptq"  # the rounding it started from
    blocks = info["blocks"]
    kinds = [b["block"].split(".")[0] for b in blocks]  # forward order: the down path, the middle, the up path
    assert kinds == sorted(kinds, key=["time_embedding", "down_blocks", "mid_block", "up_blocks"].index), kinds
    assert all(b["iters"] == 3 for b in blocks)
    assert info["iters"] == 3 * len(blocks) and info["stopped"] is None
    assert sum(b["layers"] for b in blocks) == len(art.manifest["plan"]["layers"])
    assert art.timings["calibration"]["memory_peak_mb"] > 0
    quant_error, op_by_op, _ = end_to_end_rms(art)
    assert quant_error > 0 and op_by_op < 0.6 * quant_error  # the exported plan runs in ORT as simulated
