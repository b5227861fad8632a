"""Train the embedded models `digits` (an unconditional DDPM, diffusers UNet2DModel), with `--cond`
`digits-cond` (class-conditional, for classifier-free guidance) and with `--dit` `digits-dit` (a class-conditional
DiTTransformer2DModel) on sklearn digits.

`digits-cond` is a UNet2DModel with class embeddings (`num_class_embeds` = 10 digits + 1 null label, the
embedding added to the timestep embedding) rather than a UNet2DConditionModel with cross-attention on a label
embedding: a label is one token, so cross-attention over it reduces to the same per-channel shift at more cost
and more layers to quantize, and diffusers' UNet2DModel takes the integer `class_labels` directly (its ONNX input
keeps diffusers' name). Labels are replaced by the null label with probability `--label-dropout` (CFG's
unconditional model is the same network with the null label).

`digits-dit` is diffusers' DiTTransformer2DModel (Peebles & Xie's DiT: patch embedding, adaLN-Zero blocks
conditioned on timestep + label, no learned variance) on 2×2 patches of the 16×16 digit: 64 tokens, 6 blocks of
width 96 (3 heads × 32). Its label embedding has the null label (index 10) built in and drops labels itself with
probability 0.1 in training mode, so `--label-dropout` does not apply to it. There is no VAE: it denoises pixels,
so the pipeline folder holds `transformer/` and `scheduler/` only (model_index.json names DiTPipeline with vae
null).

Seeded and deterministic on the CPU. Writes a diffusers pipeline folder (model_index.json, unet/, scheduler/)
as `DDPMPipeline.save_pretrained` does, plus `training.json` with the settings and the final loss.

    python tools/train_digits.py --out denoq/models/digits            # the shipped model
    python tools/train_digits.py --cond --out denoq/models/digits-cond  # the shipped conditional model
    python tools/train_digits.py --dit --lr 1e-3 --batch 96 --out denoq/models/digits-dit  # the shipped DiT
    python tools/train_digits.py --seed 1 --width 48 --out /tmp/digits-b  # a second, hidden-from-tuning model
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
from diffusers import DDPMPipeline, DDPMScheduler, DiTTransformer2DModel, UNet2DModel
from ship import ship_folder
from tqdm import tqdm

from denoq.models.digits_data import IMAGE_SIZE, load_digits_16

NUM_CLASSES = 10  # digits 0-9; the null label (CFG's unconditional model) is NUM_CLASSES


def build_unet(width: int, cond: bool = False) -> UNet2DModel:
    """A ~1M-parameter UNet for 16×16×1 with self-attention at 8×8 resolution; `cond`: + NUM_CLASSES + 1 class
    embeddings."""
    return UNet2DModel(
        num_class_embeds=NUM_CLASSES + 1 if cond else None,
        sample_size=IMAGE_SIZE,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=(width, 2 * width, 2 * width),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=32,
    )


def build_dit(width: int, layers: int) -> DiTTransformer2DModel:
    """A ~1.2M-parameter class-conditional DiT for 16×16×1: 2×2 patches, heads of 32 channels, adaLN-Zero."""
    return DiTTransformer2DModel(
        num_attention_heads=width // 32,
        attention_head_dim=32,
        in_channels=1,
        out_channels=1,
        num_layers=layers,
        sample_size=IMAGE_SIZE,
        patch_size=2,
        num_embeds_ada_norm=NUM_CLASSES,
        norm_type="ada_norm_zero",
    )


def write_dit_pipeline(folder: Path, dit: DiTTransformer2DModel, scheduler: DDPMScheduler) -> None:
    """A DiTPipeline folder without a VAE (pixel space): model_index.json, transformer/, scheduler/."""
    import diffusers

    dit.save_pretrained(folder / "transformer", safe_serialization=True)
    scheduler.save_pretrained(folder / "scheduler")
    index = {"_class_name": "DiTPipeline", "_diffusers_version": diffusers.__version__,
             "scheduler": ["diffusers", "DDPMScheduler"], "transformer": ["diffusers", "DiTTransformer2DModel"],
             "vae": [None, None]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cond", action="store_true", help="class-conditional with a null label (digits-cond)")
    ap.add_argument("--label-dropout", type=float, default=0.15, help="--cond: probability of the null label")
    ap.add_argument("--dit", action="store_true", help="class-conditional DiT (digits-dit) instead of a UNet")
    ap.add_argument("--dit-width", type=int, default=96)
    ap.add_argument("--dit-layers", type=int, default=6)
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    images, labels = load_digits_16()
    unet = build_dit(args.dit_width, args.dit_layers) if args.dit else build_unet(args.width, args.cond)
    ema = copy.deepcopy(unet).requires_grad_(False)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True)
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.05)
    gen = torch.Generator().manual_seed(args.seed)
    ac = scheduler.alphas_cumprod
    kind = "-dit" if args.dit else "-cond" if args.cond else ""
    bar = tqdm(range(args.steps), desc=f"train digits{kind} DDPM", unit="step")
    loss_avg = None
    for _ in bar:
        idx = torch.randint(0, images.shape[0], (args.batch,), generator=gen)
        x0 = images[idx]
        # light augmentation: random one-pixel shifts keep the model from memorizing the 1797 digits
        shift = torch.randint(-1, 2, (2,), generator=gen).tolist()
        x0 = torch.roll(x0, shifts=shift, dims=(2, 3))
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (args.batch,), generator=gen)
        a = ac[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        if args.dit:  # the DiT's label embedding drops labels to the null label itself (train mode)
            loss = torch.nn.functional.mse_loss(unet(xt, t, class_labels=labels[idx]).sample, noise)
        elif args.cond:
            drop = torch.rand((args.batch,), generator=gen) < args.label_dropout
            lab = torch.where(drop, torch.full_like(labels[idx], NUM_CLASSES), labels[idx])
            loss = torch.nn.functional.mse_loss(unet(xt, t, class_labels=lab).sample, noise)
        else:
            loss = torch.nn.functional.mse_loss(unet(xt, t).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters(), strict=True):
                pe.lerp_(p, 1.0 - args.ema)
        loss_avg = loss.item() if loss_avg is None else 0.98 * loss_avg + 0.02 * loss.item()
        bar.set_postfix(loss=f"{loss_avg:.4f}")

    meta = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    meta["final_loss_ema"] = loss_avg
    meta["parameters"] = sum(p.numel() for p in ema.parameters())

    def write(folder: Path) -> None:
        if args.dit:
            write_dit_pipeline(folder, ema, scheduler)
        else:
            DDPMPipeline(unet=ema, scheduler=scheduler).save_pretrained(folder, safe_serialization=True)
        (folder / "training.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")

    ship_folder(args.out, write)
    print(f"wrote {args.out} ({meta['parameters']} parameters, loss {loss_avg:.4f})")


if __name__ == "__main__":
    main()
