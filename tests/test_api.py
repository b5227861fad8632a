"""The Python API (denoq.quantize, denoq.load): diffusers' own DDIMPipeline driving the drop-in denoiser samples
exactly what denoq's sampler samples from the same artifact, backend and noise."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import denoq
from denoq.compiler.generate import generate
from denoq.errors import DenoqError


def _pipeline_images(unet, scheduler_config, n: int, steps: int) -> np.ndarray:
    from diffusers import DDIMPipeline, DDIMScheduler

    pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler.from_config(scheduler_config))
    pipe.set_progress_bar_config(disable=True)
    return pipe(batch_size=n, num_inference_steps=steps, generator=torch.Generator().manual_seed(0), eta=0.0,
                output_type="np").images


@pytest.mark.parametrize("backend", ["ort", "torch-sim"])
def test_drop_in_in_diffusers_ddim_pipeline_equals_denoqs_sampler(tiny_pipeline, tmp_path, backend):
    art = denoq.quantize(str(tiny_pipeline), "w8a8", out=tmp_path / "art", calib__samples=4,
                         calib__steps=4, activations__timestep_groups=2)
    assert art.manifest["recipe"]["values"]["activations.timestep_groups"] == 2
    unet = denoq.load(art.path, backend=backend)
    assert unet.config.sample_size == 16 and unet.dtype == torch.float32 and unet.device.type == "cpu"
    images = _pipeline_images(unet, art.manifest["scheduler"], n=3, steps=5)
    ours = generate(art, backend, sampler="ddim", steps=5, eta=0.0, seed=0, n=3)
    np.testing.assert_allclose(images, (ours / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy(), atol=1e-6)
    assert type(unet(torch.zeros(1, 1, 16, 16), 10)).__name__ == "UNet2DOutput"
    assert unet(torch.zeros(1, 1, 16, 16), 10, return_dict=False)[0].shape == (1, 1, 16, 16)


def test_quantize_a_pipeline_object_saves_it_beside_the_artifact(tiny_pipeline, tmp_path):
    from diffusers import DDPMPipeline

    pipe = DDPMPipeline.from_pretrained(tiny_pipeline)
    art = denoq.quantize(pipe, out=tmp_path / "art", calib__samples=2, calib__steps=2)
    assert art.manifest["model"]["name"] == str(tmp_path / "art-model")
    assert json.loads((tmp_path / "art-model" / "model_index.json").read_text())["unet"][1] == "UNet2DModel"
    denoq.load(art, backend="torch-fp")  # the FP reference reloads from the saved folder


@pytest.mark.parametrize("call, words", [
    (lambda p, o: denoq.quantize(p, out=o, calib=["a cat"]), "calib__prompts=FILE"),
    (lambda p, o: denoq.quantize(p, out=o, weights__bits=5), "weights.bits=5 is not allowed"),
    (lambda p, o: denoq.quantize(object(), out=o), "diffusers pipeline or model"),
    (lambda p, o: denoq.load(o, backend="cuda"), "unknown backend"),
])
def test_api_errors_are_one_line(tiny_pipeline, tmp_path, call, words):
    with pytest.raises(DenoqError) as info:
        call(str(tiny_pipeline), tmp_path / "art")
    assert words in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "art").exists()


def test_a_bare_denoiser_needs_its_scheduler(tmp_path):
    from conftest import tiny_unet

    with pytest.raises(DenoqError, match="pass scheduler="):
        denoq.quantize(tiny_unet(), out=tmp_path / "art")


def test_forward_loop_calibrates_on_the_users_own_sampling_loop(tiny_pipeline, tmp_path):
    """Model Optimizer's form: calib=forward_loop(model) runs the user's pipeline; every denoiser call it makes is a
    calibration input, grouped by the timesteps the user's scheduler chose."""
    from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline

    pipe = DDPMPipeline.from_pretrained(tiny_pipeline)
    ddim = DDIMPipeline(unet=pipe.unet, scheduler=DDIMScheduler.from_config(pipe.scheduler.config))
    ddim.set_progress_bar_config(disable=True)
    seen = []

    def forward_loop(model):
        seen.append(model)
        ddim(batch_size=4, num_inference_steps=6, generator=torch.Generator().manual_seed(1), output_type="np")

    art = denoq.quantize(pipe, out=tmp_path / "art", calib=forward_loop, calib__timesteps=0)
    assert seen == [pipe.unet]
    calibration = art.manifest["calibration"]
    assert calibration["source"] == "forward_loop" and calibration["inputs"] == 4 * 6
    assert calibration["timesteps"] == [int(t) for t in ddim.scheduler.timesteps]
    with pytest.raises(DenoqError, match="forward_loop never called the model"):
        denoq.quantize(pipe, out=tmp_path / "b", calib=lambda model: None)
    assert not (tmp_path / "b").exists() and not (tmp_path / "b-model").exists()
    with pytest.raises(DenoqError, match="PTQD"):
        denoq.quantize(pipe, out=tmp_path / "c", calib=forward_loop, ptqd__enabled=True, calib__timesteps=0)


def test_the_artifact_methods_run_the_commands(tiny_artifact_trt, tmp_path):
    import shutil

    art = denoq.open(shutil.copytree(tiny_artifact_trt.path, tmp_path / "art"))
    x = art.sample(3, steps=2, backend="torch-sim")
    assert x.shape == (3, 1, 16, 16)
    assert torch.equal(x, generate(art, "torch-sim", sampler="ddim", steps=2, eta=0.0, seed=0, n=3))
    report = art.evaluate(n=4, steps=2, threads=1)
    assert "psnr_vs_fp" in report and (art.path / "report.json").is_file()
    assert type(art.load("ort")).__name__ == "QuantizedDenoiser"
