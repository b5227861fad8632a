"""Step-aware mixed precision end to end: candidates as member artifacts, the per-step choice in the manifest,
the sampler switching backends per step, its refusals, eval and inspect (denoq.compiler.mixed)."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from test_cli import assert_nothing_written, run_error

from denoq.calibrators.stepprec import choose_precision
from denoq.compiler.api import compile_artifact
from denoq.compiler.artifact import Artifact
from denoq.compiler.backends import artifact_ptqd, make_backend
from denoq.compiler.cli import main
from denoq.compiler.generate import generate
from denoq.compiler.mixed import members, mixed_backend, mixed_variance
from denoq.compiler.recipe import load_recipe, mixed_members
from denoq.errors import DenoqError
from denoq.sampling import NoiseSchedule, sample

SETS = ["calib.samples=8", "calib.steps=10", "calib.sampler=ddpm", "ptqd.enabled=true", "ptqd.vsc=true",
        "weights.method=rtn", "precision.mixed=w8a8"]


@pytest.fixture(scope="module")
def mixed_artifact(tiny_pipeline, tmp_path_factory):
    return compile_artifact(str(tiny_pipeline), load_recipe("w4a8", SETS), tmp_path_factory.mktemp("mixed") / "art")


def alternating(art: Artifact) -> Artifact:
    """The same artifact with the choice forced to alternate w4a8 / w8a8 over the steps (in memory only)."""
    manifest = copy.deepcopy(art.manifest)
    for i, row in enumerate(manifest["mixed"]["steps"]):
        row["member"] = ("w4a8", "w8a8")[i % 2]
    return Artifact(art.path, manifest)


# -- the candidates ------------------------------------------------------------------------------------------------
def test_candidates_share_every_setting_but_precision():
    recipe = load_recipe("w4a8", ["calib.steps=40", "weights.group_size=32", "ptqd.enabled=true",
                                  "precision.mixed=w8a8, w4a16"])
    cands = mixed_members(recipe)
    assert list(cands) == ["w4a8", "w8a8", "w4a16"]
    assert all(c["calib.steps"] == 40 and c["ptqd.enabled"] and c["precision.mixed"] == "" for c in cands.values())
    assert cands["w4a8"]["weights.group_size"] == 32  # the recipe itself keeps its own precision overrides
    assert cands["w8a8"]["weights.bits"] == 8 and cands["w8a8"]["weights.group_size"] == 0  # w8a8's own
    assert cands["w4a16"]["weights.group_size"] == 64 and cands["w4a16"]["activations.bits"] == 16


@pytest.mark.parametrize("value, message", [("w4a8", "names a candidate twice"), ("w8a8,w8a8", "twice"),
                                            ("w9a9", "unknown recipe 'w9a9'")])
def test_bad_candidates_are_refused(value, message):
    with pytest.raises(DenoqError, match=message):
        mixed_members(load_recipe("w4a8", [f"precision.mixed={value}"]))


def test_a_bad_candidate_writes_nothing(tiny_pipeline, tmp_path, capsys):
    msg = run_error(capsys, ["compile", str(tiny_pipeline), "--recipe", "w4a8", "--set", "precision.mixed=w4a8",
                             "--out", str(tmp_path / "a")])
    assert "names a candidate twice" in msg
    assert_nothing_written(tmp_path, "a")


# -- the artifact --------------------------------------------------------------------------------------------------
def test_manifest_names_members_and_the_choice_per_step_by_the_criterion(mixed_artifact):
    m = mixed_artifact.manifest["mixed"]
    assert m["members"] == ["w4a8", "w8a8"] and m["sampler"] == "ddpm" and m["num_steps"] == 10
    schedule = NoiseSchedule.from_config(mixed_artifact.manifest["scheduler"])
    assert [row["t"] for row in m["steps"]] == schedule.timesteps(10, "ddpm").tolist()
    parts = members(mixed_artifact)
    for name, part in parts.items():
        assert part.manifest["recipe"]["values"]["weights.bits"] == int(name[1])
        assert artifact_ptqd(part) is not None  # each member carries its own PTQD head and statistics
        assert m["bops_per_call"][name] == part.manifest["cost"]["bops_per_call"]
    assert m["bops_per_call"]["w4a8"] < m["bops_per_call"]["w8a8"]
    snr_q = {n: {r["t"]: r["snr_q"][n] for r in m["steps"]} for n in m["members"]}
    choice = choose_precision(snr_q, {r["t"]: r["snr_f"] for r in m["steps"]}, m["bops_per_call"])
    assert {r["t"]: r["member"] for r in m["steps"]} == choice
    assert m["bops_per_image"]["mixed"] == sum(m["bops_per_call"][r["member"]] for r in m["steps"])
    assert sum(m["steps_per_member"].values()) == 10
    assert "precision.png" in mixed_artifact.files and "members/w8a8/model.qdq.onnx" in mixed_artifact.files


def test_each_sample_runs_on_the_member_its_timestep_chose(mixed_artifact):
    art = alternating(mixed_artifact)
    eps = mixed_backend(art, "ort", "ddpm", 10, threads=1)
    graphs = {n: make_backend(a, "ort", threads=1) for n, a in members(art).items()}
    steps = art.manifest["mixed"]["steps"]
    t = torch.tensor([steps[i]["t"] for i in (0, 1, 2, 1)])
    x = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    out = eps(x, t)
    for i in range(4):
        who = next(r["member"] for r in steps if r["t"] == int(t[i]))
        torch.testing.assert_close(out[i:i + 1], graphs[who](x[i:i + 1], t[i:i + 1]), rtol=0, atol=0)
    assert not torch.equal(graphs["w4a8"](x, t), graphs["w8a8"](x, t))  # the members do differ
    with pytest.raises(DenoqError, match="timestep 3 is not a step of ddpm 10"):
        eps(x[:1], torch.tensor([3]))


def test_sampling_switches_members_per_step_like_a_hand_written_loop(mixed_artifact):
    art = alternating(mixed_artifact)
    graphs = {n: make_backend(a, "ort", threads=1) for n, a in members(art).items()}
    who = {r["t"]: r["member"] for r in art.manifest["mixed"]["steps"]}
    used = []

    def by_hand(x, t, cond=None):
        used.append(who[int(t[0])])
        return graphs[who[int(t[0])]](x, t, cond)

    var = mixed_variance(art, "ort", "ddpm", 10)
    ref = sample(by_hand, NoiseSchedule.from_config(art.manifest["scheduler"]), sampler="ddpm", steps=10,
                 shape=(3, 1, 16, 16), generator=torch.Generator().manual_seed(5), residual_var=var)
    got = generate(art, "ort", sampler="ddpm", steps=10, eta=0.0, seed=5, n=3, threads=1)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    assert used == ["w4a8", "w8a8"] * 5


def test_variance_calibration_takes_each_steps_member_statistics(mixed_artifact):
    art = alternating(mixed_artifact)
    var = mixed_variance(art, "ort", "ddpm", 10)
    parts = members(art)
    for row in art.manifest["mixed"]["steps"]:
        stats = artifact_ptqd(parts[row["member"]])
        assert float(var[row["t"]]) == float(stats.corrected_var[row["t"]])
    assert mixed_variance(art, "ort-fp", "ddpm", 10) is None  # the FP graph has no head


def test_sampling_with_another_sampler_is_refused(mixed_artifact, capsys, tmp_path):
    with pytest.raises(DenoqError, match="per-step precision choice was made for ddpm 10 steps, sampling with ddim"):
        generate(mixed_artifact, "ort", sampler="ddim", steps=10, eta=0.0, seed=0, n=2, threads=1)
    msg = run_error(capsys, ["sample", str(mixed_artifact.path), "--sampler", "ddpm", "--steps", "20", "--n", "2",
                             "--out", str(tmp_path / "g.png")])
    assert "--sampler ddpm --steps 10" in msg and not (tmp_path / "g.png").exists()


def test_cli_eval_and_inspect_of_a_mixed_artifact(mixed_artifact, tmp_path, capsys):
    art = tmp_path / "art"
    shutil.copytree(mixed_artifact.path, art)
    assert main(["eval", str(art), "--sampler", "ddpm", "--steps", "10", "--n", "8", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    report = json.loads((art / "report.json").read_text())
    m = mixed_artifact.manifest["mixed"]
    assert report["mixed"]["members"] == ["w4a8", "w8a8"]
    assert report["bops_per_image"] == m["bops_per_image"]["mixed"]
    assert report["fd_to_fp"] > 0 and report["psnr_vs_fp"] > 0
    assert "precision.png" in report["pictures"] and "Step-aware mixed precision" in (art / "report.html").read_text()
    assert "mixed w4a8+w8a8" in out and "BOPs per image" in out
    assert main(["inspect", str(art)]) == 0
    text = capsys.readouterr().out
    assert "step-aware precision over ddpm 10 steps" in text and "per step (t:member)" in text
