"""DiT with learned variance (out_channels = 2 × in_channels, as DiT-XL/2 ships): the whole output is quantized;
denoq's DDPM uses the variance half as diffusers' DDPMScheduler does with variance_type="learned_range", DDIM and
the guidance combination use the ε half, and the drop-in drives diffusers' own DiTPipeline."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import compile_refused, save_dit_pipeline

from denoq.compiler.cli import main
from denoq.errors import DenoqError
from denoq.sampling import NoiseSchedule, module_eps, sample
from denoq.sampling.guidance import classifier_free


def learned_dit(seed: int = 0):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=1, out_channels=2,
                                 num_layers=2, sample_size=16, patch_size=2, num_embeds_ada_norm=1000,
                                 norm_type="ada_norm_zero").eval()  # DiTPipeline's null label is 1000


@pytest.fixture(scope="module")
def learned_pipeline(tmp_path_factory):
    folder = save_dit_pipeline(learned_dit(), tmp_path_factory.mktemp("models") / "dit-learned")
    cfg = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    cfg["variance_type"] = "learned_range"
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(cfg))
    return folder


@pytest.fixture(scope="module")
def learned_artifact(learned_pipeline, tmp_path_factory):
    out = tmp_path_factory.mktemp("arts") / "dit-learned"
    assert main(["compile", str(learned_pipeline), "--recipe", "w8a8", "--out", str(out), "--set", "calib.samples=4",
                 "--set", "calib.steps=6", "--set", "calib.guidance=1,3"]) == 0
    return out


def test_denoq_ddpm_uses_the_learned_range_variance_as_diffusers_does():
    from diffusers import DDPMScheduler

    dit = learned_dit()
    labels = torch.tensor([0, 2])
    sched = DDPMScheduler(num_train_timesteps=1000, variance_type="learned_range")
    ours = sample(module_eps(dit), NoiseSchedule.from_config(dict(sched.config)), sampler="ddpm", steps=8,
                  shape=(2, 1, 16, 16), generator=torch.Generator().manual_seed(3), cond=labels)
    g = torch.Generator().manual_seed(3)
    x = torch.randn((2, 1, 16, 16), generator=g)
    sched.set_timesteps(8)
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(dit(x, t.expand(2), class_labels=labels).sample, t, x, generator=g).prev_sample
    assert (ours - x).abs().max() < 1e-5


def test_variance_and_model_must_agree():
    dit = learned_dit()
    fixed = NoiseSchedule.from_config({"num_train_timesteps": 1000})
    with pytest.raises(DenoqError, match="predicts its variance but the scheduler's variance_type is fixed_small"):
        sample(module_eps(dit), fixed, sampler="ddpm", steps=2, shape=(1, 1, 16, 16), cond=torch.tensor([0]))
    learned = NoiseSchedule.from_config({"num_train_timesteps": 1000, "variance_type": "learned_range"})
    eps_only = lambda x, t, c: torch.zeros_like(x)  # noqa: E731
    with pytest.raises(DenoqError, match="needs a model that predicts its variance"):
        sample(eps_only, learned, sampler="ddpm", steps=2, shape=(1, 1, 16, 16))
    # DDIM ignores the variance half, as diffusers' DiTPipeline does
    assert sample(module_eps(dit), fixed, sampler="ddim", steps=2, shape=(1, 1, 16, 16),
                  cond=torch.tensor([0])).shape == (1, 1, 16, 16)


def test_guidance_combines_eps_and_keeps_the_conditional_variance():
    dit = learned_dit()
    x, t, labels = torch.randn(2, 1, 16, 16), torch.tensor([500, 500]), torch.tensor([1, 2])
    guided = classifier_free(module_eps(dit), torch.tensor(1000), 4.0)(x, t, labels)
    with torch.no_grad():
        cond = dit(x, t, class_labels=labels).sample
        uncond = dit(x, t, class_labels=torch.tensor([1000, 1000])).sample
    assert torch.allclose(guided[:, :1], uncond[:, :1] + 4.0 * (cond[:, :1] - uncond[:, :1]), atol=1e-5)
    assert torch.allclose(guided[:, 1:], cond[:, 1:], atol=1e-6)


def test_compile_quantizes_the_whole_output_and_the_guided_graph_matches(learned_artifact):
    import onnx

    m = json.loads((learned_artifact / "manifest.json").read_text())
    assert m["parity_gate"]["passed"] and m["checks"]["guided_vs_plain_guided_max_abs"] < 1e-4
    for name in ("model.qdq.onnx", "model.guided.qdq.onnx"):
        out = onnx.load(str(learned_artifact / name), load_external_data=False).graph.output[0]
        assert out.type.tensor_type.shape.dim[1].dim_value == 2


def test_denoq_sample_ddpm_runs_the_learned_artifact(learned_artifact, tmp_path):
    assert main(["sample", str(learned_artifact), "--sampler", "ddpm", "--steps", "4", "--n", "2", "--label", "1",
                 "--guidance", "3", "--out", str(tmp_path / "s.png")]) == 0


def test_the_drop_in_drives_diffusers_dit_pipeline(learned_pipeline, learned_artifact):
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    import denoq

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=1, out_channels=1, latent_channels=1, block_out_channels=(8,),
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                        norm_num_groups=8).eval()
    scheduler = DDIMScheduler(num_train_timesteps=1000)
    dit = DiTTransformer2DModel.from_pretrained(learned_pipeline / "transformer").eval()
    images = {}
    for name, model in (("fp", dit), ("ort-fp", denoq.load(str(learned_artifact), backend="ort-fp"))):
        pipe = DiTPipeline(transformer=model, vae=vae, scheduler=scheduler)
        images[name] = pipe(class_labels=[0, 2], guidance_scale=3.0, num_inference_steps=5,
                            generator=torch.Generator().manual_seed(1), output_type="np").images
    assert abs(images["fp"] - images["ort-fp"]).max() < 1e-4


@pytest.mark.parametrize("sets, words", [
    (("ptqd.enabled=true",), "predicts its variance (out_channels = 2 × in_channels): ptqd.enabled=true"),
    (("weights.method=adaround", "accuquant.window=2"), "weights.method=adaround"),
])
def test_output_methods_are_refused_for_learned_variance(capsys, learned_pipeline, tmp_path, sets, words):
    assert words in compile_refused(capsys, learned_pipeline, tmp_path / "art", sets=sets)
