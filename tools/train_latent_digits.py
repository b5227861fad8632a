"""Train `digits-sd`: a latent text-to-image model laid out exactly like Stable Diffusion 1.x (vae/, text_encoder/,
tokenizer/, unet/, scheduler/, model_index.json; `diffusers.StableDiffusionPipeline.from_pretrained` loads it), on
scikit-learn's digits (16×16, `denoq.models.digits_data`) with captions such as "a handwritten digit seven".

Stages, seeded and deterministic on the CPU:
1. tokenizer: a CLIP byte-level BPE vocabulary (vocab.json, merges.txt) learned from the caption words
   (tools/latent_digits.py);
2. VAE: an AutoencoderKL (1 channel, 16×16 → 4×8×8 latents) on the digits and their ±1-pixel shifts, MSE + a small
   KL term; `scaling_factor` = 1 / std of the posterior samples, as Stable Diffusion sets it;
3. UNet: a UNet2DConditionModel with cross-attention on the CLIPTextModel's last hidden states, epsilon prediction
   on the scaled latents (DDPM's linear betas, see build_scheduler); the caption is replaced by "" with probability
   `--caption-dropout` (classifier-free guidance's unconditional model). The text encoder is trained jointly with
   the UNet, or `--frozen-text` keeps it at its random initialisation. EMA weights are shipped.

Writes the pipeline folder with `StableDiffusionPipeline.save_pretrained` (float32 safetensors) plus train_info.json.
`--eval` samples through StableDiffusionPipeline (prompt "a handwritten digit <word>") and prints prompt accuracy
(the shipped digits classifier) and FD-digits per scheduler and guidance scale.

    python tools/train_latent_digits.py                    # the shipped model, denoq/models/digits-sd
    python tools/train_latent_digits.py --eval             # its quality table (docs/digits-sd.md)
    python tools/train_latent_digits.py --out /tmp/dsd --unet-steps 300 --vae-steps 100   # a quick try
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from latent_digits import (
    BOS,
    EOS,
    MAX_LENGTH,
    TEMPLATES,
    captions,
    evaluate,
    load_pipeline,
    tokenize,
    use_scheduler,
    write_tokenizer,
)
from ship import ship_folder
from tqdm import tqdm

from denoq.models import MODELS_DIR
from denoq.models.digits_data import IMAGE_SIZE, load_digits_16

DEFAULT_OUT = MODELS_DIR / "digits-sd"
LATENT_CHANNELS = 4


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def shifted_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """The 1797 digits at each of the 9 shifts (dy, dx) ∈ {-1, 0, 1}² (background -1 fills the edge):
    (images [9·1797, 1, 16, 16], labels [9·1797])."""
    images, labels = load_digits_16()
    padded = F.pad(images, (1, 1, 1, 1), value=-1.0)
    views = [padded[:, :, dy : dy + IMAGE_SIZE, dx : dx + IMAGE_SIZE] for dy in range(3) for dx in range(3)]
    return torch.cat(views).contiguous(), labels.repeat(9)


def build_vae(width: int):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(width, width),
                         layers_per_block=1, latent_channels=LATENT_CHANNELS, norm_num_groups=16,
                         sample_size=IMAGE_SIZE, mid_block_add_attention=False)


def build_text_encoder(vocab: dict[str, int], hidden: int, layers: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=4 * hidden,
                            projection_dim=hidden, num_hidden_layers=layers, num_attention_heads=hidden // 32,
                            max_position_embeddings=MAX_LENGTH, hidden_act="quick_gelu",
                            bos_token_id=vocab[BOS], eos_token_id=vocab[EOS], pad_token_id=vocab[EOS])
    return CLIPTextModel(config)


def build_unet(widths: tuple[int, ...], cross_dim: int):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(sample_size=IMAGE_SIZE // 2, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
                                layers_per_block=1, block_out_channels=widths,
                                down_block_types=("CrossAttnDownBlock2D",) * len(widths),
                                up_block_types=("CrossAttnUpBlock2D",) * len(widths),
                                cross_attention_dim=cross_dim, norm_num_groups=16,
                                attention_head_dim=tuple(w // 16 for w in widths))  # diffusers: the head *count*


def build_scheduler():
    """Stable Diffusion 1.x's DDIMScheduler config (epsilon, no clipping, "leading" spacing with steps_offset 1)
    except for the betas: DDPM's linear 0.0001 → 0.02 instead of scaled_linear 0.00085 → 0.012. On 4×8×8 latents
    SD's schedule ends at ᾱ_T = 0.0047, where x_T still tells the digit apart (256 values at SNR 0.0047) and the
    UNet learned to read the digit from x_t rather than from the prompt (prompt accuracy 24% after 800 steps);
    the linear schedule ends at ᾱ_T = 4·10⁻⁵."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")


def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for pe, p in zip(ema.parameters(), model.parameters(), strict=True):
            pe.lerp_(p, 1.0 - decay)


def smooth(avg: float | None, value: float) -> float:
    return value if avg is None else 0.98 * avg + 0.02 * value


def train_vae(args, data: torch.Tensor, gen: torch.Generator):
    vae = build_vae(args.vae_width)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.vae_lr, total_steps=args.vae_steps,
                                                pct_start=max(0.05, 2 / args.vae_steps))
    rec_avg = kl_avg = None
    bar = tqdm(range(args.vae_steps), desc="train digits-sd VAE", unit="step", mininterval=30)
    for _ in bar:
        x = data[torch.randint(0, data.shape[0], (args.batch,), generator=gen)]
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = F.mse_loss(vae.decode(z).sample, x)
        kl = post.kl().mean() / x[0].numel()  # per pixel, as the reconstruction term
        loss = rec + args.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        rec_avg, kl_avg = smooth(rec_avg, rec.item()), smooth(kl_avg, kl.item())
        bar.set_postfix(rec=f"{rec_avg:.4f}", kl=f"{kl_avg:.3f}", refresh=False)
    vae.eval().requires_grad_(False)
    return vae, {"reconstruction_mse": rec_avg, "kl_per_pixel": kl_avg}


@torch.no_grad()
def encode_all(vae, data: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std [N, 4, 8, 8] of every image, in batches."""
    means, stds = [], []
    for i in range(0, data.shape[0], 512):
        post = vae.encode(data[i : i + 512]).latent_dist
        means.append(post.mean)
        stds.append(post.std)
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def vae_quality(vae, images: torch.Tensor, labels: torch.Tensor) -> dict:
    """Reconstruction PSNR and the digits classifier's accuracy on the reconstructions (posterior means)."""
    from denoq.metrics import class_accuracy, psnr

    mean, _ = encode_all(vae, images)
    rec = torch.cat([vae.decode(mean[i : i + 512]).sample for i in range(0, mean.shape[0], 512)]).clamp(-1, 1)
    return {"psnr_db": psnr(rec, images), "classifier_accuracy": class_accuracy(rec, labels),
            "classifier_accuracy_real": class_accuracy(images, labels)}


def train_unet(args, latents: tuple[torch.Tensor, torch.Tensor], labels: torch.Tensor, scale: float, tokenizer,
               vocab: dict[str, int], gen: torch.Generator):
    text_encoder = build_text_encoder(vocab, args.text_hidden, args.text_layers)
    unet = build_unet(tuple(args.unet_widths), args.text_hidden)
    ema_unet = copy.deepcopy(unet).requires_grad_(False)
    ema_text = copy.deepcopy(text_encoder).requires_grad_(False)
    ids = tokenize(tokenizer, [*captions(), ""])  # [10·T + 1, 77]; the last row is the empty prompt
    empty = ids.shape[0] - 1
    params = list(unet.parameters())
    if args.frozen_text:
        text_encoder.eval().requires_grad_(False)
        with torch.no_grad():
            frozen = text_encoder(ids)[0]
    else:
        params += list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.unet_steps,
                                                pct_start=max(0.05, 2 / args.unet_steps))
    noise_sched = build_scheduler()
    ac = noise_sched.alphas_cumprod
    mean, std = latents
    loss_avg, curve = None, []
    bar = tqdm(range(args.unet_steps), desc="train digits-sd UNet", unit="step", mininterval=30)
    for step in bar:
        idx = torch.randint(0, mean.shape[0], (args.batch,), generator=gen)
        z0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * scale
        template = torch.randint(0, len(TEMPLATES), (args.batch,), generator=gen)
        cap = labels[idx] * len(TEMPLATES) + template
        cap = torch.where(torch.rand((args.batch,), generator=gen) < args.caption_dropout, empty, cap)
        if args.frozen_text:
            context = frozen[cap]
        else:
            used, inverse = torch.unique(cap, return_inverse=True)
            context = text_encoder(ids[used])[0][inverse]
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (args.batch,), generator=gen)
        a = ac[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        loss = F.mse_loss(unet(zt, t, encoder_hidden_states=context).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        ema_update(ema_unet, unet, decay)
        if not args.frozen_text:
            ema_update(ema_text, text_encoder, decay)
        loss_avg = smooth(loss_avg, loss.item())
        bar.set_postfix(loss=f"{loss_avg:.4f}", refresh=False)
        if args.eval_every and ((step + 1) % args.eval_every == 0 or step + 1 == args.unet_steps):
            curve.append({"step": step + 1, "loss": loss_avg, **quick_eval(ema_unet, ema_text, tokenizer)})
            tqdm.write(f"step {step + 1}: {curve[-1]}")
    return ema_unet, ema_text, noise_sched, {"unet_loss": loss_avg, "curve": curve}


def quick_eval(unet, text_encoder, tokenizer) -> dict:
    """Prompt accuracy of the EMA weights so far: 10 samples per digit, DPM-Solver++ 20 steps, guidance 1 and 3,
    decoded by the VAE trained before (the module's `vae` is set by train())."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=_STATE["vae"], text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DPMSolverMultistepScheduler.from_config(build_scheduler().config),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return {f"accuracy_g{g:g}": evaluate(pipe, 10, g, 20, seed=1, fd=False)["prompt_accuracy"] for g in (1.0, 3.0)}


_STATE: dict = {}


def parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def train(args) -> None:
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    tok_dir = args.out.parent / f".{args.out.name}.tokenizer"
    shutil.rmtree(tok_dir, ignore_errors=True)
    vocab = write_tokenizer(tok_dir)
    tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir))

    data, labels = shifted_digits()
    vae, vae_info = train_vae(args, data, gen)
    t_vae = time.perf_counter()
    latents = encode_all(vae, data)
    sample = latents[0] + latents[1] * torch.randn(latents[0].shape, generator=gen)
    scale = 1.0 / sample.std().item()
    vae.register_to_config(scaling_factor=scale)
    _STATE["vae"] = vae
    images, digit_labels = load_digits_16()
    vae_info |= vae_quality(vae, images, digit_labels)
    vae_info |= {"latent_mean": sample.mean().item(), "latent_std": sample.std().item(), "scaling_factor": scale}
    print(f"VAE: {vae_info}")
    t_latents = time.perf_counter()

    unet, text_encoder, scheduler, unet_info = train_unet(args, latents, labels, scale, tokenizer, vocab, gen)
    t_end = time.perf_counter()
    times = {"vae_s": t_vae - t0, "latents_s": t_latents - t_vae, "unet_s": t_end - t_latents, "total_s": t_end - t0}
    print(f"training time {times['total_s'] / 60:.1f} min (VAE {times['vae_s']:.0f} s, UNet {times['unet_s']:.0f} s)")

    info = {
        "seed": args.seed,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "out"},
        "text_encoder": "frozen (random initialisation)" if args.frozen_text else "trained jointly with the UNet",
        "times_s": times,
        "cpu": cpu_name(),
        "threads": args.threads,
        "vae": vae_info,
        "quick_eval_curve": unet_info["curve"],
        "losses": {"vae_reconstruction_mse": vae_info["reconstruction_mse"],
                   "vae_kl_per_pixel": vae_info["kl_per_pixel"], "unet_epsilon_mse": unet_info["unet_loss"]},
        "parameters": {"vae": parameters(vae), "text_encoder": parameters(text_encoder), "unet": parameters(unet)},
        "vocab_size": len(vocab),
        "captions": len(captions()),
        "templates": list(TEMPLATES),
        "versions": {"torch": torch.__version__},
    }
    import diffusers
    import transformers

    info["versions"] |= {"diffusers": diffusers.__version__, "transformers": transformers.__version__}

    def write(folder: Path) -> None:
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
        pipe.save_pretrained(folder, safe_serialization=True)
        shutil.rmtree(folder / "tokenizer")  # the hand-built vocab.json / merges.txt, as Stable Diffusion ships them
        shutil.copytree(tok_dir, folder / "tokenizer")
        info["bytes"] = {p.name: folder_bytes(p) for p in sorted(folder.iterdir()) if p.is_dir()}
        (folder / "train_info.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")

    ship_folder(args.out, write)
    shutil.rmtree(tok_dir)
    print(f"wrote {args.out} ({folder_bytes(args.out) / 2**20:.2f} MiB, parameters {info['parameters']})")


def run_eval(args) -> None:
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    pipe = load_pipeline(args.out)
    rows = []
    print(f"{args.out}: {args.n} samples per digit, prompt 'a handwritten digit <word>', seed {args.seed}, "
          f"CPU {cpu_name()}, {args.threads} thread(s)")
    print("| scheduler | steps | guidance | prompt accuracy | FD-digits | time (s) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for spec in args.schedulers:
        name, steps = spec.split(":")
        use_scheduler(pipe, name)
        for g in args.guidance:
            t = time.perf_counter()
            row = evaluate(pipe, args.n, g, int(steps), args.seed)
            row |= {"scheduler": name, "steps": int(steps), "guidance": g, "time_s": time.perf_counter() - t}
            rows.append(row)
            label = {"ddim": "DDIM", "dpm": "DPM-Solver++"}[name]
            print(f"| {label} | {steps} | {g:g} | {100 * row['prompt_accuracy']:.1f}% | {row['fd_digits']:.1f} | "
                  f"{row['time_s']:.0f} |", flush=True)
    best = max(rows, key=lambda r: (r["prompt_accuracy"], -r["fd_digits"]))
    print(f"highest prompt accuracy: {best['scheduler']} guidance {best['guidance']:g}: "
          f"{100 * best['prompt_accuracy']:.1f}% (FD-digits {best['fd_digits']:.1f})")
    good = [r for r in rows if r["prompt_accuracy"] >= 0.9]
    if good:
        r = min(good, key=lambda r: r["fd_digits"])
        print(f"lowest FD-digits at ≥ 90% prompt accuracy: {r['scheduler']} guidance {r['guidance']:g}: "
              f"{100 * r['prompt_accuracy']:.1f}% (FD-digits {r['fd_digits']:.1f})")
    if args.eval_json:
        args.eval_json.write_text(json.dumps({"n_per_digit": args.n, "seed": args.seed, "cpu": cpu_name(),
                                              "rows": rows}, indent=2) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: on a shared 2-core machine two threads were ~10× slower)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--vae-width", type=int, default=32)
    ap.add_argument("--vae-steps", type=int, default=1000)
    ap.add_argument("--vae-lr", type=float, default=2e-3)
    ap.add_argument("--kl-weight", type=float, default=1e-3, help="KL per latent pixel, against the per-pixel MSE")
    ap.add_argument("--text-hidden", type=int, default=64)
    ap.add_argument("--text-layers", type=int, default=2)
    ap.add_argument("--frozen-text", action="store_true", help="keep the text encoder at its random initialisation")
    ap.add_argument("--unet-widths", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--unet-steps", type=int, default=2400)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--caption-dropout", type=float, default=0.1)
    ap.add_argument("--eval-every", type=int, default=400,
                    help="quick prompt-accuracy check every N UNet steps (0: none; does not change the weights)")
    ap.add_argument("--eval", action="store_true", help="measure the model in --out instead of training")
    ap.add_argument("--n", type=int, default=50, help="--eval: samples per digit")
    ap.add_argument("--guidance", type=float, nargs="+", default=[1.0, 3.0, 5.0, 7.5])
    ap.add_argument("--schedulers", nargs="+", default=["ddim:50", "dpm:20"], help="--eval: NAME:STEPS")
    ap.add_argument("--eval-json", type=Path, help="--eval: also write the rows here")
    args = ap.parse_args()
    run_eval(args) if args.eval else train(args)


if __name__ == "__main__":
    main()
