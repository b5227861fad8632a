"""Shared fixtures: tiny diffusers pipeline folders and artifacts compiled from them (session scope)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Tiny convolutions gain nothing from threads, and oversubscribed threads on a shared 2-core machine are slow.
torch.set_num_threads(1)


def tiny_unet(seed: int = 0):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(sample_size=16, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(16, 32),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8, attention_head_dim=16)


def tiny_cond_unet(seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                norm_num_groups=8, attention_head_dim=8)


def save_pipeline(unet, folder: Path) -> Path:
    """A pipeline folder as `DiffusionPipeline.save_pretrained` writes it (model_index.json, unet/, scheduler/)."""
    from diffusers import DDPMPipeline, DDPMScheduler

    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory) -> Path:
    return save_pipeline(tiny_unet(), tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def tiny_cond_pipeline(tmp_path_factory) -> Path:
    from diffusers import DDPMScheduler, UNet2DConditionModel

    folder = tmp_path_factory.mktemp("models") / "tiny-cond"
    save_pipeline(tiny_unet(), folder)  # writes model_index.json + scheduler; the unet is replaced below
    unet: UNet2DConditionModel = tiny_cond_unet()
    unet.save_pretrained(folder / "unet")
    index = (folder / "model_index.json").read_text().replace('"UNet2DModel"', '"UNet2DConditionModel"')
    (folder / "model_index.json").write_text(index)
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(folder / "scheduler")
    return folder


def _compile(pipeline: Path, out: Path, target: str, groups: int = 1):
    from denoq.compiler.pipeline import compile_model
    from denoq.compiler.recipe import load_recipe

    recipe = load_recipe("w8a8", [f"target={target}", "calib.samples=8", "calib.steps=10",
                                  f"activations.timestep_groups={groups}"])
    return compile_model(str(pipeline), recipe, out)


@pytest.fixture(scope="session")
def tiny_artifact_trt(tiny_pipeline, tmp_path_factory):
    return _compile(tiny_pipeline, tmp_path_factory.mktemp("art") / "trt", "trt")


@pytest.fixture(scope="session")
def tiny_artifact_ort(tiny_pipeline, tmp_path_factory):
    return _compile(tiny_pipeline, tmp_path_factory.mktemp("art") / "ort", "ort-cpu")


@pytest.fixture(scope="session")
def tiny_artifact_trt_g4(tiny_pipeline, tmp_path_factory):
    """Four timestep groups per layer input: the graph carries timestep selectors."""
    return _compile(tiny_pipeline, tmp_path_factory.mktemp("art") / "trt-g4", "trt", groups=4)


@pytest.fixture(scope="session")
def tiny_artifact_ort_g4(tiny_pipeline, tmp_path_factory):
    return _compile(tiny_pipeline, tmp_path_factory.mktemp("art") / "ort-g4", "ort-cpu", groups=4)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one torch thread is several times faster than two on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_dit(seed: int = 0, classes: int = 3):
    """A tiny class-conditional DiT (pixel space, 16×16×1, 2×2 patches, two blocks of width 32)."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=1, out_channels=1,
                                 num_layers=2, sample_size=16, patch_size=2, num_embeds_ada_norm=classes,
                                 norm_type="ada_norm_zero")


def save_dit_pipeline(dit, folder: Path) -> Path:
    """A DiTPipeline folder without a VAE, as `tools/train_digits.py --dit` writes it."""
    import json

    from diffusers import DDPMScheduler

    dit.save_pretrained(folder / "transformer")
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(folder / "scheduler")
    index = {"_class_name": "DiTPipeline", "scheduler": ["diffusers", "DDPMScheduler"],
             "transformer": ["diffusers", "DiTTransformer2DModel"], "vae": [None, None]}
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def tiny_class_unet(seed: int = 0):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(sample_size=16, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(16, 32),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8, attention_head_dim=16,
                       num_class_embeds=4)  # classes 0-2, null label 3


@pytest.fixture(scope="session")
def class_pipeline(tmp_path_factory):
    return save_pipeline(tiny_class_unet(), tmp_path_factory.mktemp("models") / "tiny-class")


def compile_refused(capsys, model: Path, out: Path, *options: str, sets: tuple[str, ...] = ()) -> str:
    """Run `denoq compile MODEL --out OUT OPTIONS --set S…`; assert it exits 2 with one error line and leaves no
    artifact; return that line."""
    from denoq.compiler.cli import main

    argv = ["compile", str(model), "--out", str(out), *options]
    for item in sets:
        argv += ["--set", item]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert not out.exists()
    return err
