"""Train the shipped digits classifier that defines FD-digits (`denoq/models/classifier.py`).

Seeded and deterministic on the CPU. Trains on the train split of `split_indices(1797, 0.2, seed=0)` with light
augmentation (random ±1-pixel shifts per image, small gaussian noise), reports the test-split accuracy and writes
`model.safetensors` + `config.json` (architecture, settings, measured accuracy) into a temporary folder that is
renamed into place.

    python tools/train_classifier.py                      # the shipped classifier
    python tools/train_classifier.py --out /tmp/clf --epochs 2
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from ship import ship_folder
from tqdm import tqdm

from denoq.models.classifier import CLASSIFIER_DIR, CONFIG_FILE, WEIGHTS_FILE, DigitsClassifier
from denoq.models.digits_data import IMAGE_SIZE, load_digits_16, split_indices


def augment(x: torch.Tensor, noise_std: float, gen: torch.Generator) -> torch.Tensor:
    """Shift each image by its own random (dy, dx) in {-1, 0, 1}² (background fill -1), then add gaussian noise."""
    b = x.shape[0]
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)
    dy, dx = torch.randint(0, 3, (2, b), generator=gen)
    ar = torch.arange(IMAGE_SIZE)
    rows = (dy[:, None] + ar)[:, :, None]  # [B, H, 1]
    cols = (dx[:, None] + ar)[:, None, :]  # [B, 1, W]
    shifted = padded[torch.arange(b)[:, None, None], 0, rows, cols].unsqueeze(1)
    return shifted + noise_std * torch.randn(shifted.shape, generator=gen)


@torch.no_grad()
def accuracy(model: DigitsClassifier, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return (model(x).argmax(1) == y).float().mean().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=CLASSIFIER_DIR)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--weight-decay", type=float, default=1e-4)
    ap.add_argument("--noise-std", type=float, default=0.05)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    images, labels = load_digits_16()
    test_fraction, split_seed = 0.2, 0
    train_idx, test_idx = split_indices(len(images), test_fraction, split_seed)
    x_train, y_train = images[train_idx], labels[train_idx]
    x_test, y_test = images[test_idx], labels[test_idx]

    model = DigitsClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = -(-len(x_train) // args.batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch, pct_start=0.1
    )
    gen = torch.Generator().manual_seed(args.seed)
    bar = tqdm(range(args.epochs), desc="train digits classifier", unit="epoch")
    for _ in bar:
        model.train()
        perm = torch.randperm(len(x_train), generator=gen)
        total = 0.0
        for i in range(0, len(perm), args.batch):
            idx = perm[i : i + args.batch]
            loss = F.cross_entropy(model(augment(x_train[idx], args.noise_std, gen)), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        bar.set_postfix(loss=f"{total / len(x_train):.4f}", test_acc=f"{accuracy(model, x_test, y_test):.4f}")

    test_acc = accuracy(model, x_test, y_test)
    train_acc = accuracy(model, x_train, y_train)
    print(f"test accuracy {test_acc:.4f} ({len(x_test)} images), train accuracy {train_acc:.4f}")

    config = {
        "architecture": model.config(),
        "input": {"shape": [1, IMAGE_SIZE, IMAGE_SIZE], "range": [-1.0, 1.0]},
        "training": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "out"},
        "split": {"test_fraction": test_fraction, "seed": split_seed, "train": len(x_train), "test": len(x_test)},
        "seed": args.seed,
        "test_accuracy": test_acc,
        "train_accuracy": train_acc,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}

    def write(folder: Path) -> None:
        save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
        (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    ship_folder(args.out, write)
    size = (args.out / WEIGHTS_FILE).stat().st_size
    print(f"wrote {args.out} ({config['parameters']} parameters, {size / 1024:.0f} KiB, test accuracy {test_acc:.4f})")


if __name__ == "__main__":
    main()
