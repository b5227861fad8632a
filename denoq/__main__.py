"""`python -m denoq …` (what `torchrun -m denoq compile …` runs): the `denoq` command line."""

import sys

from denoq.compiler.cli import main

sys.exit(main())
