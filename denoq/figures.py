"""PNG bytes from matplotlib figures, reproducible (no Software / date metadata), for every picture denoq draws.

The bottom layer (matplotlib only, imported lazily): the compiler's report pictures, the calibrators' statistics
pictures and the tools use it alike.
"""

from __future__ import annotations

import io
from typing import Any


def figure_png(fig: Any, dpi: int = 110) -> bytes:
    """The figure as PNG bytes (tight bounding box, no metadata that changes between runs); the figure is closed."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()
