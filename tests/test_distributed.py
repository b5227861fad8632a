"""Data-parallel calibration (docs/distributed.md): the shard rule, the exact reconstruction of the activation
subsamples, and `torchrun --nproc-per-node 2` on gloo giving the one-process plan, refusing mismatched settings and
ending every rank when one dies."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _forward_loop import ddim_loop
from safetensors.torch import load_file

from denoq.calibrators.calibset import CalibrationSet
from denoq.calibrators.distributed import RowLayout, check_shardable
from denoq.errors import DenoqError

TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent))
SMALL = ["--set", "calib.samples=8", "--set", "calib.steps=4", "--set", "seed=3"]


def test_rank_shards_of_a_batch_sum_to_the_one_process_subsample():
    x = torch.randn(6, 3, 20, 20)  # one process: 7200 values, 4096 drawn
    one = x.reshape(-1)[torch.randint(0, x.numel(), (4096,), generator=torch.Generator().manual_seed(5))]
    parts = [RowLayout.of(torch.arange(r, 6, 2), 0, 6, doubled=False).subsample(
        x[r::2], 4096, torch.Generator().manual_seed(5)) for r in (0, 1)]
    assert torch.equal(parts[0] + parts[1], one)
    assert 0 < int((parts[0] != 0).sum()) < 4096


def test_guided_layout_places_both_halves_of_the_doubled_batch():
    layout = RowLayout.of(torch.tensor([1, 3]), 0, 4, doubled=True)
    assert layout.total == 8 and layout.local.tolist() == [1, 3, 5, 7]
    x = torch.arange(8.0).reshape(8, 1)  # one value per row: the doubled batch as one process sees it
    assert layout.subsample(x[[1, 3, 5, 7]], 4096, torch.Generator()).tolist() == [0, 1, 0, 3, 0, 5, 0, 7]


def test_a_batch_without_rows_of_some_rank_is_refused(monkeypatch):
    monkeypatch.setattr("denoq.calibrators.distributed.world_size", lambda: 4)
    check_shardable(72, 64, "calib.samples")  # the last batch holds 8 ≥ 4 trajectories
    with pytest.raises(DenoqError, match=r"calib.samples: 66 trajectories leave 2 in a batch of up to 64"):
        check_shardable(66, 64, "calib.samples")


def test_port_zero_is_refused_before_the_ranks_wait_for_each_other():
    from denoq.calibrators.distributed import init_from_environment

    with pytest.raises(DenoqError, match=r"MASTER_PORT is 0.*torchrun --standalone"):
        init_from_environment({"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "0"})


def _torchrun(args: list[str], cwd: Path, program: list[str] | None = None, env: dict[str, str] | None = None
              ) -> subprocess.CompletedProcess:
    if TORCHRUN is None:
        pytest.skip("torchrun is not installed beside this Python")
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    cmd = [TORCHRUN, "--standalone", "--nproc-per-node", "2", *(program or ["-m", "denoq"]), *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _compile_both(tmp_path: Path, recipe: str, sets: list[str], model: str = "digits") -> tuple[Path, Path]:
    from denoq.compiler.cli import main

    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["compile", model, "--recipe", recipe, *SMALL, *sets, "--out", str(one), "--quiet"]) == 0
    run = _torchrun(["compile", model, "--recipe", recipe, *SMALL, *sets, "--out", str(two), "--quiet"], tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    return one, two


#: Under torchrun: the calibrate stage alone (no export, passes or checks); rank 0 saves the plan's tensors (and
#: PTQD's) and the calibration report. argv: model, recipe, then KEY=VALUE items. With LOOP_SEED set, the
#: calibration set is what `_forward_loop.ddim_loop` feeds the model from noise of that seed ("rank": each rank's
#: own seed).
CALIBRATE = """import json, os, sys
sys.path.insert(0, @TESTS@)
import torch
from safetensors.torch import save_file
from _forward_loop import ddim_loop
from denoq.calibrators.calibset import record_calls
from denoq.calibrators.distributed import init_from_environment, leave, rank
from denoq.compiler.calibrate import calibrate, resolve_sampler
from denoq.compiler.load import load_model
from denoq.compiler.recipe import load_recipe
init_from_environment(dict(os.environ))
spec = load_model(sys.argv[1])
recipe = resolve_sampler(spec, load_recipe(sys.argv[2], sys.argv[3:]))
torch.manual_seed(recipe.config.seed)
seed = os.environ.get('LOOP_SEED')
pool = None if seed is None else record_calls(spec.module, ddim_loop(spec, rank() if seed == 'rank' else int(seed)),
                                              spec.cond_input)
cal = calibrate(spec, recipe, pool)
if rank() == 0:
    tensors = {**cal.plan.tensors(), **({} if cal.ptqd is None else cal.ptqd.to_tensors())}
    save_file({k: v.contiguous() for k, v in tensors.items()}, 'plan.safetensors')
    open('info.json', 'w').write(json.dumps(cal.info, default=str))
leave(True)
""".replace("@TESTS@", repr(str(Path(__file__).parent)))


def _calibrate_both(tmp_path: Path, recipe: str, sets: list[str], model: str = "digits", loop_seed: int | None = None
                    ) -> tuple[tuple[dict, dict], tuple[dict, dict]]:
    """The plan tensors and calibration report of the calibrate stage in this process and under 2 ranks (for the
    calibrators whose writing the CLI tests above already cover); with `loop_seed`, on the calls of a user's loop
    (`_forward_loop.ddim_loop`) instead of denoq's trajectories."""
    import json

    from denoq.calibrators.calibset import record_calls
    from denoq.compiler.calibrate import calibrate, resolve_sampler
    from denoq.compiler.load import load_model
    from denoq.compiler.recipe import load_recipe

    items = [*SMALL[1::2], *sets]
    spec = load_model(model)
    rec = resolve_sampler(spec, load_recipe(recipe, items))
    torch.manual_seed(rec.config.seed)
    pool = None if loop_seed is None else record_calls(spec.module, ddim_loop(spec, loop_seed), spec.cond_input)
    cal = calibrate(spec, rec, pool)
    tensors = {**cal.plan.tensors(), **({} if cal.ptqd is None else cal.ptqd.to_tensors())}
    one = ({k: v.contiguous() for k, v in tensors.items()}, json.loads(json.dumps(cal.info, default=str)))
    env = {} if loop_seed is None else {"LOOP_SEED": str(loop_seed)}
    run = _torchrun([model, recipe, *items], tmp_path, program=["--no-python", sys.executable, "-c", CALIBRATE],
                    env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    two = (load_file(str(tmp_path / "plan.safetensors")), json.loads((tmp_path / "info.json").read_text()))
    return one, two


def _flipped(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The fraction of the plans' integers that differ."""
    ints = [k for k in a if not a[k].dtype.is_floating_point]
    return sum(int((a[k] != b[k]).sum()) for k in ints) / sum(a[k].numel() for k in ints)


def _assert_same_tensors(a: Path | dict[str, torch.Tensor], b: Path | dict[str, torch.Tensor]) -> None:
    x, y = (t if isinstance(t, dict) else load_file(str(t)) for t in (a, b))
    assert x.keys() == y.keys()
    for key in x:
        if x[key].dtype.is_floating_point:  # scales: equal up to float reduction order
            torch.testing.assert_close(x[key], y[key], rtol=1e-6, atol=0, msg=key)
        else:  # integers: identical
            assert torch.equal(x[key], y[key]), key


def test_two_ranks_give_the_one_process_plan_with_timestep_groups(tmp_path):
    import json

    one, two = _compile_both(tmp_path, "w8a8", ["--set", "activations.timestep_groups=3"])
    _assert_same_tensors(one / "plan.safetensors", two / "plan.safetensors")
    manifests = [json.loads((p / "manifest.json").read_text()) for p in (one, two)]
    assert manifests[0]["plan"] == manifests[1]["plan"]
    assert manifests[0]["calibration"]["timestep_groups"] == manifests[1]["calibration"]["timestep_groups"]
    assert manifests[0]["calibration"]["inputs"] == manifests[1]["calibration"]["inputs"] == 32


def test_two_ranks_give_the_one_process_gptq_plan_and_ptqd_tables(tmp_path):
    (a, _), (b, _) = _calibrate_both(tmp_path, "w4a8-fast", ["ptqd.enabled=true", "weights.hessian_samples=6"])
    assert any(k.startswith("ptqd.") for k in a)
    _assert_same_tensors(a, b)


def test_two_ranks_choose_the_one_process_step_precisions(tmp_path):
    """precision.mixed: every member calibrated by both ranks (rank 0 sends its written member to rank 1), the
    SNR sums all-reduced: the same member plans and the same choice per step as one process."""
    import json

    one, two = _compile_both(tmp_path, "w4a8-fast", ["--set", "precision.mixed=w8a8", "--set",
                                                     "weights.method=rtn"])
    for member in ("w4a8-fast", "w8a8"):
        _assert_same_tensors(one / "members" / member / "plan.safetensors", two / "members" / member /
                             "plan.safetensors")
    steps = [json.loads((p / "manifest.json").read_text())["mixed"]["steps"] for p in (one, two)]
    assert [(s["t"], s["member"]) for s in steps[0]] == [(s["t"], s["member"]) for s in steps[1]]
    # the members' scales agree to float rounding, which moves a few activation roundings: SNRs within 2%
    for a, b in zip(steps[0], steps[1], strict=True):
        assert b["snr_q"] == pytest.approx(a["snr_q"], rel=0.02)


def test_two_ranks_give_the_one_process_instance_aware_groups(tmp_path):
    """IGQ-ViT on the DiT: instances' channel ranges placed and summed, layer errors summed; a budget that makes
    the allocation choose between 1, 2 and 4 groups gives the same choice and plan."""
    (a, info_a), (b, info_b) = _calibrate_both(tmp_path, "w8a8", ["activations.igq_groups=4",
                                                                  "activations.igq_budget=1.15",
                                                                  "attention.quantize=true"], model="digits-dit")
    assert a.keys() == b.keys() and _flipped(a, b) == 0
    assert all(torch.allclose(a[k], b[k], rtol=1e-6, atol=0) for k in a if a[k].dtype.is_floating_point)
    assert info_a["igq"] == info_b["igq"] and sorted(set(info_a["igq"]["layers"].values())) == [1, 2, 4]


def test_two_ranks_search_timestep_groups_as_one_process_up_to_float_order(tmp_path):
    """ADP-DM's differentiable search: both ranks draw the same batches, each computes its rows' share, gradients
    summed. Its arg-max is sensitive to float order (one process with 1 or 2 threads differs in 2 of 62 layers on
    this set): at most 10% of the layers may end in other groups, and the others take the same tables."""
    (a, info_a), (b, info_b) = _calibrate_both(tmp_path, "w8a8", ["activations.timestep_groups=2",
                                                                  "activations.group_search=differentiable"])
    assert info_a["group_search"]["method"] == info_b["group_search"]["method"] == "differentiable"
    groups = [info_a["timestep_groups"], info_b["timestep_groups"]]
    moved = [name for name in groups[0] if groups[0][name] != groups[1][name]]
    assert len(moved) <= 0.1 * len(groups[0]), moved
    same = [k for k in a if k.endswith(".input_scale") and k.removesuffix(".input_scale") not in moved]
    assert same and all(torch.allclose(a[k], b[k], rtol=1e-6, atol=0) for k in same)
    assert info_b["group_search"]["output_error_ratio"] == pytest.approx(
        info_a["group_search"]["output_error_ratio"], rel=0.1)


def test_ordered_sum_adds_in_the_one_process_order_across_ranks(tmp_path):
    """GPTQ's Hessian sums travel along the ranks: rank 1 adds its parts after rank 0's running sum, so floats whose
    sum depends on the order come out as one process adds them (an all-reduce adds the ranks' partial sums)."""
    parts = [[1e16, 1.0, 1.0], [-1e16, 1.0]]  # left to right: ((1e16 + 1) + 1) − 1e16 + 1 = 1
    program = ("import os, sys, torch\n"
               "from denoq.calibrators.distributed import init_from_environment, leave, ordered_sum, rank\n"
               "init_from_environment(dict(os.environ))\n"
               f"mine = [torch.tensor([v], dtype=torch.float64) for v in {parts}[rank()]]\n"
               "total = ordered_sum(mine, (1,), 'a test sum')\n"
               "sys.stdout.write(f'rank {rank()} total {float(total[0])!r}\\n')\n"
               "sys.stdout.flush()\n"
               "leave(True)\n")
    def left_to_right(values: list[float]) -> float:
        total = 0.0
        for v in values:
            total += v
        return total

    # one process gets 1.0; adding each rank's partial sum instead gets 0.0
    assert left_to_right(parts[0] + parts[1]) == 1.0 and left_to_right([left_to_right(p) for p in parts]) == 0.0
    run = _torchrun([], tmp_path, program=["--no-python", sys.executable, "-c", program])
    assert run.returncode == 0, run.stderr[-2000:]
    assert "rank 0 total 1.0" in run.stdout and "rank 1 total 1.0" in run.stdout, run.stdout


def test_python_api_under_a_process_group_returns_the_artifact_on_rank_0_only(tmp_path):
    # a model object: rank 0 saves it beside the artifact, every rank calibrates from the saved folder
    program = ("import sys\n"
               "import torch.distributed as dist\n"
               "from diffusers import DDPMScheduler\n"
               "import denoq\n"
               "from denoq.compiler.load import load_model\n"
               "dist.init_process_group('gloo')\n"
               "spec = load_model('digits')\n"
               "art = denoq.quantize(spec.module, 'w8a8', out='art', progress=False, calib__samples=8,\n"
               "                     calib__steps=4, scheduler=DDPMScheduler.from_config(spec.scheduler_config))\n"
               "sys.stdout.write(f'rank {dist.get_rank()} returned {type(art).__name__}\\n')  # one write\n"
               "sys.stdout.flush()\n"
               "dist.barrier()\n"
               "dist.destroy_process_group()\n")
    run = _torchrun([], tmp_path, program=["--no-python", sys.executable, "-c", program])
    assert run.returncode == 0, run.stderr[-2000:]
    assert "rank 0 returned CompiledArtifact" in run.stdout and "rank 1 returned NoneType" in run.stdout
    assert (tmp_path / "art" / "manifest.json").is_file() and (tmp_path / "art-model" / "model_index.json").is_file()


def test_ranks_with_different_settings_stop_with_one_line_and_write_nothing(tmp_path):
    denoq = [sys.executable, "-m", "denoq"]
    script = 'exec "$@" --set seed=$RANK'  # rank 0 seed 0, rank 1 seed 1
    run = _torchrun(["sh", "-c", script, "sh", *denoq, "compile", "digits", *SMALL[:4], "--out", "art", "--quiet"],
                    tmp_path, program=["--no-python"])
    assert run.returncode != 0
    lines = [ln for ln in run.stderr.splitlines() if ln.startswith("error: ")]
    # every rank raises the same line; torchrun ends the others once the first has exited, so 1 or 2 are printed
    assert 1 <= len(lines) <= 2 and all("rank 1's settings fingerprint" in ln for ln in lines), run.stderr[-2000:]
    assert {ln.split(":")[1].strip() for ln in lines} <= {"rank 0", "rank 1"}
    assert not (tmp_path / "art").exists()


def test_a_rank_that_dies_ends_the_run_and_nothing_is_written(tmp_path):
    # rank 1 is killed where it would reduce its first activation statistics: rank 0 waits in that collective
    # (torchrun's macros would turn a shell's `$$` into `$`, so the rank's program is Python)
    program = ("import os, runpy, signal, sys\n"
               "import denoq.calibrators.stats as stats\n"
               "if os.environ['RANK'] == '1':\n"
               "    stats.reduce_stats = lambda _: os.kill(os.getpid(), signal.SIGKILL)\n"
               "sys.argv[0] = 'denoq'\n"
               "runpy.run_module('denoq', run_name='__main__')\n")
    run = _torchrun(["compile", "digits", *SMALL, "--out", "art", "--quiet"], tmp_path,
                    program=["--no-python", sys.executable, "-c", program])
    assert run.returncode != 0
    assert "rank      : 1 (local_rank: 1)" in run.stderr and "SIGKILL" in run.stderr, run.stderr[-2000:]
    assert not (tmp_path / "art").exists()


def test_two_ranks_reconstruct_block_outputs_as_one_process(tmp_path):
    """w4a8's block-output reconstruction: each rank captures half of every block's inputs and runs its share of
    every batch, the gradients are summed, so the ranks learn the one-process quantizers up to the order of float
    sums (a few integers flip)."""
    (a, info_a), (b, info_b) = _calibrate_both(tmp_path, "w4a8", ["accuquant.iters=10", "accuquant.block_inputs=32"])
    assert _flipped(a, b) < 0.01
    learned = [info_a["accuquant"], info_b["accuquant"]]
    assert [x["block"] for x in learned[0]["blocks"]] == [x["block"] for x in learned[1]["blocks"]]
    assert learned[1]["probe_eps_error_after"] == pytest.approx(learned[0]["probe_eps_error_after"], rel=0.05)


def test_two_ranks_reconstruct_over_sampler_windows_as_one_process(tmp_path):
    """AdaRound over AccuQuant's 2-step windows of the whole network, from the quantized trajectories: every rank
    draws the same trajectories and noise, runs its share and the gradients are summed. Without activation
    quantizers (W4A16) nothing rounds on the activations' path, so the losses follow one process's to float
    rounding (with them, float order flips a few activation roundings: see the block-output test)."""
    (a, info_a), (b, info_b) = _calibrate_both(tmp_path, "w4a16", [
        "weights.method=adaround", "accuquant.granularity=network", "accuquant.window=2", "accuquant.iters=5",
        "accuquant.batch=4", "accuquant.init=rtn", "accuquant.start=quantized"])
    learned = [info_a["accuquant"], info_b["accuquant"]]
    assert learned[1]["loss_curve"] == pytest.approx(learned[0]["loss_curve"], rel=1e-4)
    assert learned[1]["trajectory_drift"] == pytest.approx(learned[0]["trajectory_drift"], rel=1e-4)
    assert _flipped(a, b) <= 1e-3


def test_two_ranks_calibrate_a_forward_loop_as_one_process(tmp_path):
    """A user's own loop under torchrun: every rank runs the whole loop, keeps its share of the recorded rows and
    reduces as with denoq's trajectories: the one-process plan (timestep groups and GPTQ)."""
    (a, info_a), (b, _) = _calibrate_both(tmp_path, "w4a8-fast", ["activations.timestep_groups=2"], loop_seed=5)
    assert info_a["source"] == "forward_loop" and info_a["inputs"] == 8 * 4 and info_a["timestep_groups"]
    _assert_same_tensors(a, b)


def test_ranks_whose_forward_loops_differ_stop_with_one_line(tmp_path):
    run = _torchrun(["digits", "w8a8", *SMALL[1::2]], tmp_path, program=["--no-python", sys.executable, "-c",
                                                                         CALIBRATE], env={"LOOP_SEED": "rank"})
    assert run.returncode != 0
    assert "rank 1's forward_loop calls (inputs, timesteps, conditioning) differs from rank 0's" in run.stderr, \
        run.stderr[-2000:]
    assert "seed its noise" in run.stderr and not (tmp_path / "plan.safetensors").exists()


def test_what_cannot_be_split_across_ranks_is_refused_before_any_work(monkeypatch):
    from denoq.compiler.data_parallel import check_ranks
    from denoq.compiler.load import load_model
    from denoq.compiler.recipe import load_recipe

    for module in ("denoq.compiler.data_parallel", "denoq.calibrators.distributed"):
        monkeypatch.setattr(f"{module}.world_size", lambda: 2)
    spec = load_model("digits")
    one_row = CalibrationSet(x=[torch.zeros(1, *spec.sample_shape)], t=[10])
    with pytest.raises(DenoqError, match=r"the forward_loop's rows: 1 trajectories leave 1 in a batch"):
        check_ranks(spec, load_recipe("w8a8", []), pool=one_row, guided=False)
    windows = load_recipe("w4a8", ["accuquant.granularity=network", "accuquant.batch=1"])
    with pytest.raises(DenoqError, match=r"accuquant.batch=1 leaves ranks without trajectories .* at least 2"):
        check_ranks(spec, windows, pool=None, guided=False)
