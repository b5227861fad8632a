"""The allowed values of calibrator settings that the recipe offers as keys, defined once: the calibrators check
their settings against these tuples and `denoq.compiler.recipe_keys` gives them as the keys' `choices`. The module
imports nothing, so `denoq recipes` and `--help` read it without loading torch.
"""

#: `weights.bits`: the weight bits of the rounding methods (`gptq.GptqSettings`; RTN rounds with it too).
WEIGHT_BITS = (8, 7, 6, 4, 3)

# `accuquant.*` (`accuquant.AccuQuantSettings`, the window in `accuquant_window.py`)
BACKPROPS = ("recompute", "naive")
GRADIENTS = ("full", "stop")
OBJECTIVES = ("end", "every", "outputs")
STARTS = ("fp", "quantized")
GRANULARITIES = ("network", "block")
