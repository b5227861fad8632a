"""ADP-DM's differentiable timestep-group search (`activations.group_search = differentiable`): the runs of a
search result, shared scales of non-contiguous groups, and `search_groups` on the tiny UNet from the DP plan."""

from __future__ import annotations

import math

import pytest
import torch
from test_parity import end_to_end_rms
from test_timegroups import SETTINGS, T, calib_ts, make_stats

from denoq.calibrators.observers import ObserverSettings, clip_range
from denoq.calibrators.timegroups import group_scale, layer_zero_point, scale_table, segment_of_timestep
from denoq.calibrators.timegroups_search import _runs, search_groups

GROUPS = 3
SETS = ["calib.samples=8", "calib.steps=10", f"activations.timestep_groups={GROUPS}"]


# -- runs ------------------------------------------------------------------------------------------------------------
def test_runs_are_maximal_with_their_labels():
    ts = [0, 100, 200, 300, 400, 500]
    assert _runs(ts, [0, 0, 1, 1, 0, 2]) == ([(0, 100), (200, 300), (400, 400), (500, 500)], [0, 1, 0, 2])
    assert _runs(ts, [1] * 6) == ([(0, 500)], [1])
    assert _runs(ts, [0, 1, 0, 1, 0, 1]) == ([(t, t) for t in ts], [0, 1, 0, 1, 0, 1])
    assert _runs([], []) == ([], [])


# -- scale_table with labels --------------------------------------------------------------------------------------
def _observed_scale(st, ts: list[int], settings: ObserverSettings) -> float:
    """The observer on the pooled values of timesteps `ts`, under the layer's one zero point (as scale_table)."""
    values = torch.cat([v for t in ts for v in st.values[t]])
    lo, hi = clip_range(values, min(st.amin[t] for t in ts), max(st.amax[t] for t in ts), settings)
    return group_scale(lo, hi, settings, layer_zero_point(st, settings))


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: f"{s.method}-{'s' if s.signed else 'u'}")
def test_one_label_on_two_segments_shares_the_union_scale(settings: ObserverSettings):
    ts = calib_ts(6)
    radius = dict(zip(ts, [1.0, 1.2, 6.0, 6.5, 2.5, 3.0], strict=True))
    st = make_stats(ts, radius.__getitem__, gaussian=True)
    segments = [(ts[0], ts[1]), (ts[2], ts[3]), (ts[4], ts[5])]
    owner = segment_of_timestep(segments, T)

    shared = scale_table(st, segments, settings, T, labels=[0, 1, 0])
    union = _observed_scale(st, [ts[0], ts[1], ts[4], ts[5]], settings)
    assert shared.scale.shape == (T,) and shared.zero_point == layer_zero_point(st, settings)
    assert torch.all(shared.scale[owner != 1] == torch.tensor(union, dtype=torch.float32))
    assert float(shared.scale[ts[2]]) == pytest.approx(_observed_scale(st, ts[2:4], settings), rel=1e-6)
    assert len(set(shared.scale.tolist())) == 2

    separate = scale_table(st, segments, settings, T)
    assert torch.equal(separate.scale, scale_table(st, segments, settings, T, labels=[0, 1, 2]).scale)
    for n, (first, last) in enumerate(segments):
        expected = _observed_scale(st, [t for t in ts if first <= t <= last], settings)
        assert torch.all(separate.scale[owner == n] == torch.tensor(expected, dtype=torch.float32))
    # the narrow first segment, on its own, would get a finer scale than the union's
    assert float(separate.scale[ts[0]]) < 0.8 * float(shared.scale[ts[0]])
    # the label's name does not matter, only which segments share it
    assert torch.equal(scale_table(st, segments, settings, T, labels=[7, 3, 7]).scale, shared.scale)


# -- search_groups on the tiny UNet -------------------------------------------------------------------------------
def _dp_inputs(pipeline, target: str) -> dict:
    """What `calibrate` hands `search_groups` (the DP plan, its groups, the statistics, the calibration set), caught
    by running `calibrate` with `activations.group_search = differentiable` and a spy in place of the search."""
    from denoq.compiler import calibrate as calibrate_module
    from denoq.compiler.load import load_model
    from denoq.compiler.recipe import load_recipe

    caught: dict = {}

    def spy(model, plan, stats, segments, calib, settings, **kwargs):
        caught.update(model=model, plan=plan, stats=stats, segments=segments, calib=calib, settings=settings,
                      seed=kwargs["seed"])
        return plan, segments, {}

    recipe = load_recipe("w8a8", [*SETS, f"target={target}", "activations.group_search=differentiable"])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(calibrate_module, "search_groups", spy)
        calibrate_module.calibrate(load_model(str(pipeline)), recipe)
    assert caught, "calibrate did not call the search"
    return caught


def _search(dp: dict, iters: int, seed: int | None = None):
    return search_groups(dp["model"], dp["plan"], dp["stats"], dp["segments"], dp["calib"], dp["settings"],
                         seed=dp["seed"] if seed is None else seed, iters=iters)


@pytest.fixture(scope="module")
def dp_trt(tiny_pipeline):
    return _dp_inputs(tiny_pipeline, "trt")


@pytest.fixture(scope="module")
def dp_ort(tiny_pipeline):
    return _dp_inputs(tiny_pipeline, "ort-cpu")


@pytest.fixture(scope="module")
def searched_trt(dp_trt):
    return _search(dp_trt, 20)


@pytest.mark.parametrize("fixture", ["dp_trt", "dp_ort"])
def test_no_iterations_reproduce_the_dp_plan(fixture, request):
    dp = request.getfixturevalue(fixture)
    assert all(len(segs) == GROUPS for segs in dp["segments"].values())
    plan, segments, _ = _search(dp, 0)
    assert segments == dp["segments"]
    assert set(plan.layers) == set(dp["plan"].layers)
    for name, lp in plan.layers.items():
        ref = dp["plan"].layers[name]
        assert torch.equal(lp.input.scale, ref.input.scale), name
        assert lp.input.zero_point == ref.input.zero_point and lp.input.signed == ref.input.signed
        assert torch.equal(lp.weight_int, ref.weight_int) and torch.equal(lp.weight_scale, ref.weight_scale)
        assert (lp.output is None) == (ref.output is None)
        if lp.output is not None:
            assert torch.equal(lp.output.scale, ref.output.scale)
    assert plan.target == dp["plan"].target and plan.num_train_timesteps == dp["plan"].num_train_timesteps


def test_search_is_deterministic(dp_trt, searched_trt):
    plan, segments, terms = searched_trt
    again_plan, again_segments, again_terms = _search(dp_trt, 20)
    assert again_segments == segments and again_terms == terms
    for name, lp in plan.layers.items():
        assert torch.equal(again_plan.layers[name].input.scale, lp.input.scale), name


def test_searched_tables_are_constant_on_the_runs(dp_trt, searched_trt):
    plan, segments, terms = searched_trt
    calibrated = sorted(dp_trt["calib"].t)
    assert set(segments) == set(dp_trt["plan"].layers)
    for name, runs in segments.items():
        covered = [t for first, last in runs for t in calibrated if first <= t <= last]
        assert covered == calibrated, name  # every calibrated timestep once, runs ascending
        assert all(first in calibrated and last in calibrated and first <= last for first, last in runs)
        table = plan.layers[name].input.scale
        assert table.shape == (T,) and torch.all(table > 0)
        owner = segment_of_timestep(runs, T)
        for n in range(len(runs)):
            assert torch.all(table[owner == n] == table[owner == n][0]), (name, runs[n])
        assert len(set(table.tolist())) <= GROUPS  # runs of one group share its scale
    assert set(terms) == {"output_error_ratio", "entropy"}
    assert all(math.isfinite(v) for v in terms.values())
    assert terms["output_error_ratio"] > 0 and 0 <= terms["entropy"] <= math.log(GROUPS)


def test_another_seed_draws_other_batches(dp_trt, searched_trt):
    _, _, terms = searched_trt
    assert _search(dp_trt, 20, seed=dp_trt["seed"] + 1)[2] != terms


# -- the compiler ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def searched_ort_artifact(tiny_pipeline, tmp_path_factory):
    from denoq.compiler.pipeline import compile_model
    from denoq.compiler.recipe import load_recipe

    recipe = load_recipe("w8a8", [*SETS, "target=ort-cpu", "activations.group_search=differentiable"])
    out = tmp_path_factory.mktemp("art") / "ort-search"
    return compile_model(str(tiny_pipeline), recipe, out)


def test_compile_records_the_search(searched_ort_artifact):
    manifest = searched_ort_artifact.manifest
    search = manifest["calibration"]["group_search"]
    assert search["method"] == "differentiable"
    assert set(search) == {"method", "output_error_ratio", "entropy"}
    assert all(math.isfinite(search[k]) and search[k] >= 0 for k in ("output_error_ratio", "entropy"))
    quant_error, op_by_op, fused = end_to_end_rms(searched_ort_artifact)  # the bounds of test_parity
    assert quant_error > 0 and op_by_op < 0.6 * quant_error and fused < 1.15 * quant_error


def test_search_moves_groups_with_output_quantizers(searched_ort_artifact, dp_ort):
    """ort-cpu quantizes layer outputs too (straight-through in the search): the gradients still reach the logits,
    and after the default iterations some layer's timesteps changed group."""
    searched = {name: [tuple(s) for s in segs]
                for name, segs in searched_ort_artifact.manifest["calibration"]["timestep_groups"].items()}
    assert searched_ort_artifact.manifest["calibration"]["timesteps"] == dp_ort["calib"].t
    changed = [name for name, segs in dp_ort["segments"].items() if searched.get(name) != segs]
    assert changed
