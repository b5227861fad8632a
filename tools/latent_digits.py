"""The pieces of `digits-sd` (denoq/models/digits-sd, trained by tools/train_latent_digits.py) that training, the
quality check and the tests share: the captions, the CLIP BPE tokenizer built from them, and sampling + scoring
through diffusers' own `StableDiffusionPipeline`.

Needs `transformers` (CLIPTextModel, CLIPTokenizer) besides diffusers.
"""

from __future__ import annotations

import itertools
import json
import re
from collections import Counter
from pathlib import Path

import torch

from denoq.models.captions import DIGIT_WORDS, TEMPLATES, caption, captions, eval_prompt  # noqa: F401

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 77  # CLIP's context length, as in Stable Diffusion 1.x
#: what CLIP's pre-tokenizer splits a lower-cased caption into: runs of letters, single numerals, punctuation runs
WORD = re.compile(r"[^\W\d_]+|\d|[^\s\w]+")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's reversible byte → printable unicode character table (byte-level BPE's base alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def learn_bpe(texts: list[str]) -> list[tuple[str, str]]:
    """BPE merges learned from the words of `texts` (CLIP's convention: the last symbol of a word ends in </w>):
    repeatedly merge the most frequent adjacent pair (ties: the smallest pair) until every word is one symbol."""
    byte_map = bytes_to_unicode()
    words = Counter(w for t in texts for w in WORD.findall(t.lower()))
    split = {}
    for w in words:
        chars = [byte_map[b] for b in w.encode("utf-8")]
        split[w] = (*chars[:-1], chars[-1] + "</w>")
    merges = []
    while True:
        pairs: Counter = Counter()
        for w, symbols in split.items():
            for pair in itertools.pairwise(symbols):
                pairs[pair] += words[w]
        if not pairs:
            return merges
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        for w, symbols in split.items():
            out, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            split[w] = tuple(out)


def write_tokenizer(folder: Path) -> dict[str, int]:
    """Write a CLIPTokenizer folder (vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json) as
    Stable Diffusion 1.x's: the 256 byte symbols and their </w> forms, the merges learned from the captions, then
    <|startoftext|> and <|endoftext|> (also the unknown and padding token). Returns the vocabulary."""
    folder.mkdir(parents=True, exist_ok=True)
    merges = learn_bpe(captions())
    base = list(bytes_to_unicode().values())
    tokens = base + [b + "</w>" for b in base] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {t: i for i, t in enumerate(tokens)}
    assert len(vocab) == len(tokens), "duplicate tokens"
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
    lines = ["#version: 0.2", *(f"{a} {b}" for a, b in merges)]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    config = {**special, "tokenizer_class": "CLIPTokenizer", "model_max_length": MAX_LENGTH, "do_lower_case": True,
              "errors": "replace", "add_prefix_space": False, "clean_up_tokenization_spaces": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2, sort_keys=True) + "\n")
    return vocab


def tokenize(tokenizer, texts: list[str]) -> torch.Tensor:
    """Token ids [N, 77] exactly as StableDiffusionPipeline.encode_prompt makes them."""
    return tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def load_pipeline(folder: Path | str):
    """The pipeline folder through diffusers' DiffusionPipeline.from_pretrained (its model_index.json's class;
    components it leaves out passed as None, as SD3 without T5 needs), float32 on the CPU, progress bars off."""
    from diffusers import DiffusionPipeline

    index = json.loads((Path(folder) / "model_index.json").read_text())
    absent = {k: None for k, v in index.items() if v == [None, None]}
    pipe = DiffusionPipeline.from_pretrained(str(folder), **absent)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def use_scheduler(pipe, name: str) -> None:
    """name: 'ddim' (the folder's DDIMScheduler), 'dpm' (DPMSolverMultistepScheduler from the same config) or 'own'
    (the folder's scheduler, whatever it is)."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    if name == "own":
        return
    kinds = {"ddim": DDIMScheduler, "dpm": DPMSolverMultistepScheduler}
    pipe.scheduler = kinds[name].from_config(pipe.scheduler.config)


@torch.no_grad()
def sample_digits(pipe, n: int, guidance: float, steps: int, seed: int = 0,
                  digits: range | list[int] = range(10)) -> tuple[torch.Tensor, torch.Tensor]:
    """n images per digit for the prompts eval_prompt(k): (images [N, 1, 16, 16] in [-1, 1], asked digits [N]).
    One pipeline call for all digits with one seeded generator, so the result is a function of the arguments."""
    digits = list(digits)
    out = pipe([eval_prompt(k) for k in digits], num_images_per_prompt=n, guidance_scale=guidance,
               num_inference_steps=steps, generator=torch.Generator().manual_seed(seed), output_type="pt")
    images = out.images.float() * 2.0 - 1.0  # the pipeline returns [0, 1]; the metrics take model range [-1, 1]
    return images, torch.tensor(digits).repeat_interleave(n)


def evaluate(pipe, n: int, guidance: float, steps: int, seed: int = 0, fd: bool = True) -> dict:
    """Prompt accuracy (the fraction the shipped digits classifier assigns the asked digit) and FD-digits of
    n samples per digit."""
    from denoq.metrics import class_accuracy, fd_digits

    images, labels = sample_digits(pipe, n, guidance, steps, seed)
    row = {"samples": len(labels), "prompt_accuracy": class_accuracy(images, labels)}
    if fd:
        row["fd_digits"] = fd_digits(images)
    return row
