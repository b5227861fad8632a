"""The captions of the embedded text-to-image models `digits-sd` and `digits-flow`: what they were trained on, what
they are calibrated with by default (`TextModel.default_prompts`), and the prompts of their quality check."""

from __future__ import annotations

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
#: caption templates; {word} is the digit as a word ("seven"), {num} as a numeral ("7")
TEMPLATES = (
    "a handwritten digit {word}",
    "a handwritten digit {num}",
    "the number {word}",
    "the number {num}",
    "a digit {num}",
    "a digit {word}",
    "a picture of the handwritten number {word}",
    "{word}",
    "{num}",
)
EVAL_TEMPLATE = "a handwritten digit {word}"  # the prompt of the quality check


def caption(template: str, k: int) -> str:
    return template.format(word=DIGIT_WORDS[k], num=str(k))


def captions() -> list[str]:
    """Every training caption, digit-major: captions()[k * len(TEMPLATES) + j] is TEMPLATES[j] for digit k."""
    return [caption(t, k) for k in range(10) for t in TEMPLATES]


def eval_prompt(k: int) -> str:
    return caption(EVAL_TEMPLATE, k)
