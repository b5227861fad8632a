"""The modules behind the scripts `tools/bench.py`, `tools/gptq_bench.py` and `tools/study.py`.

The scripts put `tools/` on the import path (Python does, for a script run as `python tools/NAME.py`); these modules
import each other as `toolkit.…` and denoq as installed. Nothing here is part of the denoq package.
"""
