"""Stable Diffusion 1.x and SDXL pipelines (random-init reduced configs in the real classes): prompt calibration
through the pipelines' own text encoders, graphs named and shaped as diffusers' ONNX exports (dynamic batch, tokens
and resolution, float timesteps), the drop-in denoiser driven by diffusers' own pipelines and schedulers, and
one-line refusals of bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
import torch
from _sd_pipelines import tiny_sd, tiny_sdxl

import denoq
from denoq.compiler.cli import main
from denoq.errors import DenoqError
from denoq.sampling.cond import Conditioning, timestep_index

FAST = ["--set", "calib.samples=4", "--set", "calib.steps=4", "--quiet"]
SCHEDULERS = ("DDIMScheduler", "DPMSolverMultistepScheduler", "EulerDiscreteScheduler", "UniPCMultistepScheduler")


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """(pipeline folder, artifact): SD 1.x layout with a PNDM scheduler, W8A8 with two timestep groups,
    calibrated on denoq's built-in prompts with guidance 4."""
    root = tmp_path_factory.mktemp("sd")
    folder = tiny_sd(root / "pipe")
    assert main(["compile", str(folder), "--out", str(root / "art"), *FAST, "--set", "calib.guidance=4",
                 "--set", "activations.timestep_groups=2"]) == 0
    return folder, denoq.open(root / "art")


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl")
    folder = tiny_sdxl(root / "pipe")
    prompts = root / "prompts.txt"
    prompts.write_text("a handwritten digit seven\n\nthe number 2\n")
    assert main(["compile", str(folder), "--out", str(root / "art"), *FAST, "--set", "calib.guidance=5",
                 "--set", f"calib.prompts={prompts}"]) == 0
    return folder, denoq.open(root / "art")


def _pipeline(folder):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _latents(pipe, scheduler: str) -> torch.Tensor:
    import diffusers

    pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    return pipe(["a handwritten digit seven", "two"], num_inference_steps=4, guidance_scale=4.0, output_type="latent",
                generator=torch.Generator().manual_seed(0)).images


@pytest.mark.parametrize("which", ["sd", "sdxl"])
def test_calibration_used_the_pipelines_prompts(request, which):
    _, art = request.getfixturevalue(which)
    cond = art.manifest["calibration"]["conditioning"]
    assert cond["source"] == "prompts" and cond["representative"] is True
    assert cond["prompts"] == (4 if which == "sd" else 2)  # the built-in list, or the file's two non-empty lines
    text = art.manifest["model"]["text"]
    assert text["pipeline"] == ("StableDiffusionPipeline" if which == "sd" else "StableDiffusionXLPipeline")
    assert text["added_conditions"] == ([] if which == "sd" else ["text_embeds", "time_ids"])


@pytest.mark.parametrize("which", ["sd", "sdxl"])
def test_graph_inputs_are_named_and_dynamic_as_diffusers_exports(request, which):
    _, art = request.getfixturevalue(which)
    graph = onnx.load(str(art.file("model.qdq.onnx")), load_external_data=False).graph
    f = onnx.TensorProto.FLOAT
    shapes = {i.name: (i.type.tensor_type.elem_type, [d.dim_param or d.dim_value for d in
                                                      i.type.tensor_type.shape.dim]) for i in graph.input}
    want = {"sample": (f, ["batch", 4, "2*height", "2*width"]), "timestep": (f, ["batch"]),
            "encoder_hidden_states": (f, ["batch", "tokens", 32])}
    if which == "sdxl":
        want.update({"text_embeds": (f, ["batch", 16]), "time_ids": (f, ["batch", 6])})
    assert shapes == want


@pytest.mark.parametrize("which", ["sd", "sdxl"])
@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_drop_in_ort_fp_matches_the_pytorch_pipeline(request, which, scheduler):
    """diffusers' own pipeline and scheduler drive the drop-in: the FP graph gives the PyTorch pipeline's latents to
    float rounding (Euler's and UniPC's fractional / trailing timesteps included)."""
    folder, art = request.getfixturevalue(which)
    pipe = _pipeline(folder)
    want = _latents(pipe, scheduler)
    pipe.unet = denoq.load(art, backend="ort-fp")
    got = _latents(pipe, scheduler)
    assert torch.allclose(got, want, atol=2e-4, rtol=0), float((got - want).abs().max())
    pipe.unet = denoq.load(art, backend="ort")
    quantized = _latents(pipe, scheduler)
    assert torch.isfinite(quantized).all() and not torch.equal(quantized, want)


@pytest.mark.parametrize("which", ["sd", "sdxl"])
def test_quantized_graph_matches_the_simulation_at_fractional_timesteps(request, which):
    """ORT on the Q/DQ graph vs the PyTorch simulation at Euler-like timesteps: the tables are read at the same
    rows (nearest training timestep), so the two agree far below the quantization error on every sample but at
    most one. (A table read at another row would show on every fractional timestep; one sample may differ where
    ORT's and torch's sine of the time embedding differ by an ulp at a quantizer's rounding tie, which tips that
    sample's whole embedding: on an AVX-512 host SDXL's t = 640.5 row does, 0.42 of its quantization error.)"""
    _, art = request.getfixturevalue(which)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([999.0, 640.5, 641.5, 12.25])
    emb = torch.randn(4, 77, 32, generator=g)
    pooled = torch.randn(4, 16, generator=g)
    cond = emb if which == "sd" else Conditioning({"encoder_hidden_states": emb, "text_embeds": pooled,
                                                   "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 4)})
    ort, sim, fp = (denoq.load(art, backend=b) for b in ("ort", "torch-sim", "torch-fp"))
    kw = {"encoder_hidden_states": emb, **({} if which == "sd" else {"added_cond_kwargs": {
        k: v for k, v in cond.tensors.items() if k != "encoder_hidden_states"}})}
    y_ort, y_sim, y_fp = (m(x, t, **kw).sample for m in (ort, sim, fp))
    ratios = sorted(float((y_ort[i] - y_sim[i]).norm() / (y_sim[i] - y_fp[i]).norm()) for i in range(len(t)))
    assert ratios[-2] < 0.01, ratios


def test_timestep_rows_round_half_to_even_and_clip():
    t = torch.tensor([0.5, 1.5, 832.5, 832.51, -3.0, 1200.7])
    assert timestep_index(t, 1000).tolist() == [0, 2, 832, 833, 0, 999]
    assert timestep_index(torch.tensor([5, 999]), 1000).tolist() == [5, 999]


def test_tables_are_gathered_at_the_rounded_timestep_in_the_graph(sd):
    _, art = sd
    graph = onnx.load(str(art.file("model.qdq.onnx")), load_external_data=False).graph
    producer = {o: n for n in graph.node for o in n.output}
    gathers = [n for n in graph.node if n.op_type == "Gather" and "timestep_ratio" in n.name]
    assert gathers, "two timestep groups give selector Gathers"
    chain = [producer[gathers[0].input[1]]]
    while chain[-1].input[0] in producer:
        chain.append(producer[chain[-1].input[0]])
    assert [n.op_type for n in chain] == ["Cast", "Clip", "Round"] and chain[-1].input[0] == "timestep"


def test_dynamic_token_length_and_resolution(sd):
    _, art = sd
    fp = denoq.load(art, backend="torch-fp")
    ort = denoq.load(art, backend="ort-fp")
    x, emb = torch.randn(2, 4, 16, 12), torch.randn(2, 20, 32)
    want = fp(x, torch.tensor([10.5, 700.0]), encoder_hidden_states=emb).sample
    got = ort(x, torch.tensor([10.5, 700.0]), encoder_hidden_states=emb).sample
    assert torch.allclose(got, want, atol=1e-4)


def test_denoqs_own_sampler_refuses_text_models_and_other_schedulers(sd, capsys):
    _, art = sd
    assert main(["sample", str(art.path), "--n", "1", "--out", str(art.path.parent / "s.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "text-to-image" in err[0] and "denoq.load" in err[0]
    from denoq.sampling.names import check_sampler_class

    with pytest.raises(DenoqError, match="PNDMScheduler, which denoq's own sampler does not implement"):
        check_sampler_class(art.manifest["scheduler"])


def test_inspect_shows_scheduler_and_text_conditioning(sd, capsys):
    _, art = sd
    assert main(["inspect", str(art.path)]) == 0
    out = capsys.readouterr().out
    assert "scheduler PNDMScheduler" in out and "StableDiffusionPipeline" in out and "calibrated on prompts" in out


def test_bare_unet_with_embeddings_and_random_opt_in(sd, tmp_path):
    """A UNet folder without text encoders: the embeddings file conditions it; random conditioning only on request,
    flagged in the manifest; neither → refused."""
    from safetensors.torch import save_file

    folder, _ = sd
    bare = tmp_path / "bare"
    for part in ("unet", "scheduler"):
        shutil.copytree(folder / part, bare / part)
    index = json.loads((folder / "model_index.json").read_text())
    (bare / "model_index.json").write_text(json.dumps({k: index[k] for k in ("_class_name", "unet", "scheduler")}))
    emb = tmp_path / "emb.safetensors"
    save_file({"prompt_embeds": torch.randn(3, 77, 32), "negative_prompt_embeds": torch.zeros(1, 77, 32)}, str(emb))
    assert main(["compile", str(bare), "--out", str(tmp_path / "a"), *FAST, "--set", f"calib.embeddings={emb}",
                 "--set", "calib.guidance=3"]) == 0
    assert denoq.open(tmp_path / "a").manifest["calibration"]["conditioning"]["source"] == "embeddings"
    assert main(["compile", str(bare), "--out", str(tmp_path / "r"), *FAST, "--set",
                 "calib.conditioning=random"]) == 0
    assert denoq.open(tmp_path / "r").manifest["calibration"]["conditioning"] == {
        "source": "random", "representative": False, "prompts": 0}
    with pytest.raises(DenoqError, match="no text encoders"):
        denoq.quantize(str(bare), out=tmp_path / "n", calib__samples=2, calib__steps=2)
    assert not (tmp_path / "n").exists()


def _bad_inputs(tmp_path, sd_folder):
    from safetensors.torch import save_file

    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    wrong = tmp_path / "wrong.safetensors"
    save_file({"prompt_embeds": torch.randn(2, 77, 16), "negative_prompt_embeds": torch.zeros(1, 77, 16)}, str(wrong))
    return [
        (sd_folder, ["calib.prompts=" + str(tmp_path / "missing.txt")], "no such file"),
        (sd_folder, [f"calib.prompts={empty}"], "holds no prompt"),
        (sd_folder, [f"calib.prompts={empty}", "calib.conditioning=random"], "two sources of the text conditioning"),
        (tiny_sd(tmp_path / "narrow", encoder_width=16), [], "cross_attention_dim is 32"),
        (tiny_sdxl(tmp_path / "one", second_encoder=False), [], "no text_encoder_2"),
        (sd_folder, [f"calib.embeddings={wrong}"], "prompt_embeds has shape [2, 77, 16], the model takes [N, L, 32]"),
        ("digits", ["calib.prompts=p.txt"], "are for text-to-image models"),
    ]


def test_bad_input_is_one_line_exit_2_and_nothing_written(sd, tmp_path, capsys):
    folder, _ = sd
    cases = _bad_inputs(tmp_path, folder)
    capsys.readouterr()  # saving the fixtures' pipelines prints transformers' bars
    for i, (model, sets, words) in enumerate(cases):
        out = tmp_path / f"art{i}"
        args = ["compile", str(model), "--out", str(out), *FAST]
        for s in sets:
            args += ["--set", s]
        assert main(args) == 2, words
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], (words, err)
        assert not out.exists()


def test_drop_in_refuses_arguments_the_graph_does_not_take(sd):
    _, art = sd
    unet = denoq.load(art, backend="ort-fp")
    with pytest.raises(DenoqError, match="takes no timestep_cond"):
        unet(torch.zeros(1, 4, 8, 8), 10, encoder_hidden_states=torch.zeros(1, 77, 32), timestep_cond=torch.ones(1))
    out = unet(torch.zeros(1, 4, 8, 8), 10, encoder_hidden_states=torch.zeros(1, 77, 32), timestep_cond=None,
               cross_attention_kwargs=None, return_dict=False)[0]
    assert out.shape == (1, 4, 8, 8) and np.isfinite(out.numpy()).all()
