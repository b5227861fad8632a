"""PixArt-Σ, SD3 and Flux pipelines (random-init reduced configs in the real classes): prompt calibration through
the pipelines' own T5 / CLIP encoders, graphs named and shaped as the transformers' forward arguments (dynamic
batch, tokens, resolution or packed tokens), the drop-in transformer driven by diffusers' own pipelines and
schedulers — its ort-fp graph equal to the PyTorch pipeline — and one-line refusals of bad input."""

from __future__ import annotations

import json
import shutil

import onnx
import pytest
import torch
from _transformer_pipelines import tiny_flux, tiny_pixart, tiny_sd3

import denoq
from denoq.compiler.cli import main

FAST = ["--set", "calib.samples=4", "--set", "calib.steps=4", "--set", "calib.size=8", "--quiet"]
BUILDERS = {"pixart": tiny_pixart, "sd3": tiny_sd3, "flux": tiny_flux}
PIPELINES = {"pixart": "PixArtSigmaPipeline", "sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}
#: pipeline arguments: 16 × 16 px through the tiny 2× VAE (8 × 8 latents); PixArt-Σ's aspect binning is for its
#: real sizes only
CALL = {"pixart": {"use_resolution_binning": False}, "sd3": {}, "flux": {}}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("transformers")
    return {name: build(root / name) for name, build in BUILDERS.items()}


@pytest.fixture(scope="module")
def arts(folders, tmp_path_factory):
    root = tmp_path_factory.mktemp("arts")
    out = {}
    for name, folder in folders.items():
        assert main(["compile", str(folder), "--recipe", "w8a8", "--out", str(root / name), *FAST]) == 0
        out[name] = denoq.open(root / name)
    return out


def _pipeline(folder):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _latents(pipe, name: str) -> torch.Tensor:
    return pipe(["a photo of the digit seven", "two"], num_inference_steps=3, height=16, width=16,
                output_type="latent", generator=torch.Generator().manual_seed(0), **CALL[name]).images


@pytest.mark.parametrize("name", list(BUILDERS))
def test_the_drop_in_drives_the_diffusers_pipeline(folders, arts, name):
    pipe = _pipeline(folders[name])
    assert type(pipe).__name__ == PIPELINES[name]
    ref = _latents(pipe, name)
    scale = float(ref.abs().max())
    pipe.transformer = denoq.load(arts[name], backend="ort-fp")
    fp = _latents(pipe, name)
    assert float((fp - ref).abs().max()) <= 1e-5 * scale  # the FP graph is the PyTorch transformer
    pipe.transformer = denoq.load(arts[name], backend="ort")
    q = _latents(pipe, name)
    err = float((q - ref).abs().max())
    assert torch.isfinite(q).all() and 0 < err < 0.2 * scale  # W8A8: near, not equal


@pytest.mark.parametrize("name", list(BUILDERS))
def test_calibration_encoded_prompts_with_the_pipelines_encoders(arts, name):
    m = arts[name].manifest
    assert m["calibration"]["conditioning"]["source"] == "prompts"
    assert m["model"]["text"]["pipeline"] == PIPELINES[name]
    sampler = m["recipe"]["values"]["calib.sampler"]
    assert sampler == ("ddim" if name == "pixart" else "flow-euler")  # auto: the model's own family
    times = m["calibration"]["timesteps"]
    assert (max(times) <= 1.0) == (name == "flux")  # FluxPipeline feeds t / 1000; SD3 t ∈ [0, 1000]
    assert m["parity_gate"]["passed"] and m["checks"]["fp_onnx_vs_torch_max_abs"] < 1e-4


def _inputs(art) -> dict[str, list]:
    graph = onnx.load(str(art.file("model.qdq.onnx")), load_external_data=False).graph
    return {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}


def test_graph_inputs_are_named_as_the_forward_arguments_with_dynamic_axes(arts):
    pix, sd3, flux = (_inputs(arts[n]) for n in ("pixart", "sd3", "flux"))
    assert pix == {"sample": ["batch", 4, 8, 8], "timestep": ["batch"],  # PixArt keeps its resolution
                   "encoder_hidden_states": ["batch", "tokens", 24], "encoder_attention_mask": ["batch", "tokens"]}
    assert sd3["sample"] == ["batch", 16, "2*height", "2*width"] and sd3["pooled_projections"] == ["batch", 32]
    assert flux["sample"] == ["batch", "seq", 64] and flux["img_ids"] == ["seq", 3]
    assert flux["txt_ids"] == ["tokens", 3] and flux["guidance"] == ["batch"]
    assert flux["encoder_hidden_states"] == ["batch", "tokens", 24]


def test_sd3_graph_runs_at_another_resolution_and_flux_at_another_token_count(folders, arts):
    """The exported axes are real: SD3 at 12 × 12 latents, Flux at 36 image tokens, against PyTorch."""
    from denoq.compiler.load import load_model
    from denoq.engines.ort import OrtBackend
    from denoq.sampling.cond import Conditioning

    g = torch.Generator().manual_seed(0)
    sd3 = load_model(str(folders["sd3"])).module
    x, t = torch.randn(2, 16, 12, 12, generator=g), torch.tensor([900.0, 35.5])
    cond = Conditioning({"encoder_hidden_states": torch.randn(2, 5, 40, generator=g),
                         "pooled_projections": torch.randn(2, 32, generator=g)})
    ref = sd3(x, timestep=t, **cond.kwargs()).sample
    got = OrtBackend(arts["sd3"].file("model.fp.onnx"))(x, t, cond)
    assert float((got - ref).abs().max()) < 1e-4
    flux = load_model(str(folders["flux"])).module
    x, t = torch.randn(1, 36, 64, generator=g), torch.tensor([0.42])
    rows, cols = torch.meshgrid(torch.arange(6), torch.arange(6), indexing="ij")
    cond = Conditioning({"encoder_hidden_states": torch.randn(1, 7, 24, generator=g),
                         "pooled_projections": torch.randn(1, 16, generator=g), "txt_ids": torch.zeros(7, 3),
                         "img_ids": torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).float(),
                         "guidance": torch.tensor([3.5])})
    ref = flux(x, timestep=t, **cond.kwargs()).sample
    got = OrtBackend(arts["flux"].file("model.fp.onnx"))(x, t, cond)
    assert float((got - ref).abs().max()) < 1e-4


def test_the_flux_img_ids_are_the_pipelines(folders):
    from diffusers import FluxPipeline

    from denoq.compiler.load import load_model
    from denoq.compiler.text_cond import image_conditions

    spec = load_model(str(folders["flux"]), size=12)
    ids = image_conditions(spec.text, 1, spec.latent_hw, spec.token_grid, 8, 5)["img_ids"]
    assert torch.equal(ids, FluxPipeline._prepare_latent_image_ids(1, 6, 6, "cpu", torch.float32))


@pytest.mark.parametrize("layers", ["@cond", "@in,@out,@cond"])
def test_the_cond_alias_keeps_the_embedders_and_modulation_in_fp(folders, layers, tmp_path):
    from denoq.compiler.load import load_model
    from denoq.layers import quantizable_layers, select_layers

    for name in BUILDERS:
        spec = load_model(str(folders[name]))
        _, kept = select_layers(quantizable_layers(spec.module), spec.layer_patterns(layers))
        assert kept and all(("embed" in k or "norm" in k or "adaln" in k or "caption" in k or k in ("proj_out",)
                                 or k == "x_embedder") for k in kept), (name, kept)
        assert not any(k.endswith(("to_q", "to_k", "proj_mlp")) for k in kept)


def _refused(capsys, *args: str) -> str:
    assert main(["compile", *args, "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    return err


def test_bad_input_is_refused_in_one_line_with_nothing_written(folders, tmp_path, capsys):
    long = tmp_path / "long.txt"
    long.write_text(" ".join(["seven"] * 90) + "\n")
    out = tmp_path / "out"
    err = _refused(capsys, str(folders["sd3"]), "--out", str(out), *FAST[:-1], "--set", f"calib.prompts={long}")
    assert "tokens" in err and "tokenizer" in err and not out.exists()
    err = _refused(capsys, str(folders["flux"]), "--out", str(out), *FAST[:-1], "--set", "calib.guidance=4")
    assert "guidance-distilled" in err and not out.exists()
    broken = tmp_path / "no-t5"
    shutil.copytree(folders["flux"], broken)
    index = json.loads((broken / "model_index.json").read_text())
    index["text_encoder_2"] = [None, None]
    (broken / "model_index.json").write_text(json.dumps(index))
    err = _refused(capsys, str(broken), "--out", str(out), *FAST[:-1])
    assert "text_encoder_2" in err and not out.exists()
    swapped = tmp_path / "sd3-ddim"
    shutil.copytree(folders["sd3"], swapped)
    (swapped / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": "DDIMScheduler"}))
    err = _refused(capsys, str(swapped), "--out", str(out))
    assert "velocity" in err and "FlowMatchEulerDiscreteScheduler" in err
    flow_pixart = tmp_path / "pixart-flow"
    shutil.copytree(folders["pixart"], flow_pixart)
    (flow_pixart / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({"_class_name": "FlowMatchEulerDiscreteScheduler"}))
    err = _refused(capsys, str(flow_pixart), "--out", str(out))
    assert "predicts ε" in err and not out.exists()


def test_the_readme_flux_example_runs(folders, arts, monkeypatch):
    """The README's text-to-image snippet as written, on the tiny Flux folder and its artifact."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    (code,) = [b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if "FluxPipeline" in b]
    code = code.replace('"my-flux-folder"', repr(str(folders["flux"]))).replace('"art"', repr(str(arts["flux"].path)))
    code = code.replace("num_inference_steps=28", "num_inference_steps=2, height=16, width=16")
    scope: dict = {}
    exec(compile("from diffusers import FluxPipeline\nimport denoq\n" + code, "README.md", "exec"), scope)
    assert type(scope["pipe"].transformer).__name__ == "QuantizedDenoiser" and scope["image"].size == (16, 16)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_gptq_weights_calibrate_through_the_transformers_forward(folders, name, tmp_path):
    """GPTQ's Hessians and forward order call the transformer as the pipelines do (keyword conditioning)."""
    out = tmp_path / "gptq"
    assert main(["compile", str(folders[name]), "--recipe", "w8a8", "--set", "weights.method=gptq", "--out", str(out),
                 *FAST]) == 0
    m = denoq.open(out).manifest
    assert m["recipe"]["values"]["weights.method"] == "gptq" and m["parity_gate"]["passed"]
