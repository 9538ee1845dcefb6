"""The one way figures are saved: PNG bytes and offline plotly JSON, written atomically."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ...artifacts import atomic_write_bytes  # noqa: E402

__all__ = ["save_png", "save_plotly", "plt"]


def save_png(fig: Any, path: str | Path, dpi: int = 120) -> Path:
    """Write a matplotlib figure as PNG (atomically) and close it."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def save_plotly(fig: Any, path: str | Path) -> Path:
    """Write a plotly figure as JSON (the report embeds it with an offline plotly.js)."""
    return atomic_write_bytes(path, fig.to_json().encode())
