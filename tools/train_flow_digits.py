"""Train `digits-flow`: a flow-matching text-to-image model laid out exactly like Stable Diffusion 3
(transformer/ = SD3Transformer2DModel, text_encoder/ + text_encoder_2/ = CLIPTextModelWithProjection, tokenizers,
vae/, scheduler/ = FlowMatchEulerDiscreteScheduler, no T5: `StableDiffusion3Pipeline` fills its 256 tokens with
zeros, as it does for SD3 without text_encoder_3), on scikit-learn's digits with digits-sd's captions.

The text side and the VAE are digits-sd's (denoq/models/digits-sd, tools/train_latent_digits.py), frozen: both CLIP
encoders carry its trained text encoder, each with its own seeded random projection (pooled 2 × 64), and the VAE
its 4 × 8 × 8 latents (with SD3's `shift_factor` 0). Only the MMDiT is trained, on rectified flow (Esser et al.
2024, eq. 1–3): x_σ = (1 − σ) x₀ + σ ε, target v = ε − x₀, σ logit-normal (SD3's §3.1 choice), the model called at
timestep 1000 σ as the pipeline calls it; the caption is the empty prompt with probability `--caption-dropout`
(classifier-free guidance's unconditional model). EMA weights are shipped.

    python tools/train_flow_digits.py                    # the shipped model, denoq/models/digits-flow
    python tools/train_flow_digits.py --eval             # its FP quality (docs/flow-matching.md)
    python tools/train_flow_digits.py --out flow-work/try --steps 300   # a quick try
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

TOOLS = Path(__file__).resolve().parent
if str(TOOLS) not in sys.path:
    sys.path.insert(0, str(TOOLS))

from latent_digits import captions, evaluate  # noqa: E402
from ship import ship_folder  # noqa: E402
from train_latent_digits import (  # noqa: E402
    cpu_name,
    ema_update,
    encode_all,
    folder_bytes,
    parameters,
    shifted_digits,
    smooth,
)

from denoq.models import EMBEDDED, MODELS_DIR  # noqa: E402

DEFAULT_OUT = MODELS_DIR / "digits-flow"
T5_TOKENS = 256  # StableDiffusion3Pipeline's max_sequence_length: zeros without text_encoder_3


def text_side(seed: int):
    """digits-sd's tokenizer and VAE, and two CLIPTextModelWithProjection carrying its trained text encoder with
    seeded random projections; all frozen."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    src = EMBEDDED["digits-sd"]
    tokenizer = CLIPTokenizer.from_pretrained(src / "tokenizer")
    encoders = []
    for k in range(2):
        torch.manual_seed(seed + k)
        enc = CLIPTextModelWithProjection.from_pretrained(src / "text_encoder")  # text_projection: seeded init
        encoders.append(enc.eval().requires_grad_(False))
    vae = AutoencoderKL.from_pretrained(src / "vae").eval().requires_grad_(False)
    vae.register_to_config(shift_factor=0.0)
    return tokenizer, encoders, vae


def build_transformer(width: int, layers: int, joint: int, pooled: int):
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, out_channels=4, num_layers=layers,
                                 attention_head_dim=32, num_attention_heads=width // 32, joint_attention_dim=joint,
                                 caption_projection_dim=width, pooled_projection_dim=pooled, pos_embed_max_size=8,
                                 qk_norm="rms_norm")


def build_scheduler():
    """Rectified flow's Euler scheduler, no shift: the 4 × 8 × 8 latents are small, SD3's shift 3 is for 1024 px."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)


def pipeline(transformer, tokenizer, encoders, vae):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=build_scheduler(), vae=vae,
                                    text_encoder=encoders[0], tokenizer=tokenizer, text_encoder_2=encoders[1],
                                    tokenizer_2=tokenizer, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def encode_captions(pipe) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds [91, 77 + 256, 128], pooled [91, 128]) of every caption and, last, the empty prompt, as the
    pipeline encodes them."""
    texts = [*captions(), ""]
    pe, _, pooled, _ = pipe.encode_prompt(prompt=texts, prompt_2=None, prompt_3=None, device=torch.device("cpu"),
                                          do_classifier_free_guidance=False, max_sequence_length=T5_TOKENS)
    return pe, pooled


def train(args) -> None:
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    tokenizer, encoders, vae = text_side(args.seed)
    width = encoders[0].config.hidden_size
    model = build_transformer(args.width, args.layers, 2 * width, 2 * encoders[0].config.projection_dim)
    ema = copy.deepcopy(model).requires_grad_(False)
    pipe = pipeline(ema, tokenizer, encoders, vae)
    embeds, pooled = encode_captions(pipe)
    empty = embeds.shape[0] - 1
    data, labels = shifted_digits()
    mean, std = encode_all(vae, data)
    scale = float(vae.config.scaling_factor)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps,
                                                pct_start=max(0.05, 2 / args.steps))
    templates = len(captions()) // 10
    loss_avg, curve = None, []
    bar = tqdm(range(args.steps), desc="train digits-flow MMDiT", unit="step", mininterval=30)
    for step in bar:
        idx = torch.randint(0, mean.shape[0], (args.batch,), generator=gen)
        x0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * scale
        cap = labels[idx] * templates + torch.randint(0, templates, (args.batch,), generator=gen)
        cap = torch.where(torch.rand((args.batch,), generator=gen) < args.caption_dropout, empty, cap)
        sigma = torch.sigmoid(torch.randn((args.batch,), generator=gen))  # logit-normal(0, 1)
        noise = torch.randn(x0.shape, generator=gen)
        s = sigma.view(-1, 1, 1, 1)
        xs = (1 - s) * x0 + s * noise
        v = model(xs, timestep=1000 * sigma, encoder_hidden_states=embeds[cap], pooled_projections=pooled[cap]).sample
        loss = F.mse_loss(v, noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        ema_update(ema, model, min(args.ema, (1 + step) / (10 + step)))
        loss_avg = smooth(loss_avg, loss.item())
        bar.set_postfix(loss=f"{loss_avg:.4f}", refresh=False)
        if args.eval_every and ((step + 1) % args.eval_every == 0 or step + 1 == args.steps):
            row = evaluate(pipe, 10, args.eval_guidance, 20, seed=1, fd=False)
            curve.append({"step": step + 1, "loss": loss_avg, "accuracy": row["prompt_accuracy"]})
            tqdm.write(f"step {step + 1}: {curve[-1]}")
    seconds = time.perf_counter() - t0
    print(f"training time {seconds / 60:.1f} min")
    import diffusers
    import transformers

    info = {"seed": args.seed, "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
                                            if k != "out"},
            "objective": "rectified flow, v = noise − x0, logit-normal(0, 1) σ, EMA weights",
            "text_side": "digits-sd's text encoder (frozen) in both CLIP slots, seeded random projections; no T5",
            "times_s": {"total_s": seconds}, "cpu": cpu_name(), "threads": args.threads, "loss": loss_avg,
            "quick_eval_curve": curve, "parameters": {"transformer": parameters(ema)},
            "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                         "transformers": transformers.__version__}}

    def write(folder: Path) -> None:
        pipe.save_pretrained(folder, safe_serialization=True)
        for name in ("tokenizer", "tokenizer_2"):  # digits-sd's hand-built vocab.json / merges.txt, as shipped there
            shutil.rmtree(folder / name)
            shutil.copytree(EMBEDDED["digits-sd"] / "tokenizer", folder / name)
        info["bytes"] = {p.name: folder_bytes(p) for p in sorted(folder.iterdir()) if p.is_dir()}
        (folder / "train_info.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")

    ship_folder(args.out, write)
    print(f"wrote {args.out} ({folder_bytes(args.out) / 2**20:.2f} MiB, {parameters(ema):,} parameters)")


def run_eval(args) -> None:
    from diffusers import StableDiffusion3Pipeline

    torch.set_num_threads(args.threads)
    pipe = StableDiffusion3Pipeline.from_pretrained(str(args.out), text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    print(f"{args.out}: {args.n} samples per digit, prompt 'a handwritten digit <word>', seed {args.seed}, "
          f"CPU {cpu_name()}, {args.threads} thread(s)")
    print("| steps | guidance | prompt accuracy | FD-digits | time (s) |")
    print("| --- | --- | --- | --- | --- |")
    for steps in args.eval_steps:
        for g in args.guidance:
            t = time.perf_counter()
            row = evaluate(pipe, args.n, g, steps, args.seed)
            print(f"| {steps} | {g:g} | {100 * row['prompt_accuracy']:.1f}% | {row['fd_digits']:.1f} | "
                  f"{time.perf_counter() - t:.0f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--width", type=int, default=64, help="MMDiT width (heads of 32)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--caption-dropout", type=float, default=0.1)
    ap.add_argument("--eval-every", type=int, default=500, help="quick prompt-accuracy check every N steps (0: none)")
    ap.add_argument("--eval-guidance", type=float, default=3.0)
    ap.add_argument("--eval", action="store_true", help="measure the model in --out instead of training")
    ap.add_argument("--n", type=int, default=26, help="--eval: samples per digit")
    ap.add_argument("--guidance", type=float, nargs="+", default=[1.0, 2.0, 3.0, 5.0])
    ap.add_argument("--eval-steps", type=int, nargs="+", default=[20, 50])
    args = ap.parse_args()
    run_eval(args) if args.eval else train(args)


if __name__ == "__main__":
    main()
