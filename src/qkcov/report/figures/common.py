"""The one way figures are saved: PNG bytes, scatter specs (drawn as SVG by the report) and
offline plotly JSON (older sections), written atomically; and the report's colours."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
# names from records (a group "$\\frac{a}$") are drawn as text, never parsed as TeX, in every figure
matplotlib.rcParams["text.parse_math"] = False
import matplotlib.pyplot as plt  # noqa: E402

from ...artifacts import atomic_write_bytes  # noqa: E402

__all__ = [
    "save_png",
    "palette_png",
    "save_plotly",
    "save_scatter",
    "plt",
    "POSITIVE",
    "NEGATIVE",
    "QUERY",
    "OTHER",
    "GROUP_COLOURS",
    "LEGEND_FONTSIZE",
]

# one colour per role in every figure and in the token view
POSITIVE = "#2166ac"  # keys sharing the feature with the query (blue)
NEGATIVE = "#d6604d"  # keys not sharing it (red)
QUERY = "#1b7837"  # the query token (green)
OTHER = "#9e9e9e"  # everything else (grey)
# positive keys by group when a feature has several (no red, no green: negatives', query's)
# legends readable at the report's width (~1200 px; figures at 100–120 dpi): 10 pt ≈ 14–17 px
LEGEND_FONTSIZE = 10
GROUP_COLOURS = ["#2166ac", "#8073ac", "#e08214", "#c51b7d", "#542788", "#7f3b08", "#4393c3",
                 "#b35806", "#de77ae", "#2d004b"]  # fmt: skip


def save_png(fig: Any, path: str | Path, dpi: int = 120) -> Path:
    """Write a matplotlib figure as PNG (atomically) and close it. Log axes get plain tick
    labels: TeX is off for every figure (names from records are drawn as text), and the
    default log labels are TeX."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            if axis.get_scale() == "log":
                axis.set_major_formatter(FuncFormatter(_decade_label))
                # minor ticks at 2 and 5 per decade: readable, and a third of the tick objects;
                # labelled too when the axis spans under two decades (else one label or none)
                axis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))
                lo, hi = sorted(abs(float(x)) for x in axis.get_view_interval())
                narrow = lo > 0 and hi / lo < 100
                axis.set_minor_formatter(FuncFormatter(_plain) if narrow else NullFormatter())
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return atomic_write_bytes(path, palette_png(buf.getvalue()))


_SUPERSCRIPT = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")


def _decade_label(value: float, _pos: Any = None) -> str:
    """A log axis' label at a power of ten, one style for all: 0.1 … 1000 written out, 10ⁿ
    beyond (plain text, no TeX); nothing between decades."""
    if not (value > 0 and math.isfinite(value)):
        return ""
    e = round(math.log10(value))
    if abs(math.log10(value) - e) > 1e-9:
        return ""
    if -1 <= e <= 3:
        return f"{10.0**e:g}"
    return "10" + str(e).translate(_SUPERSCRIPT)


def _plain(value: float, _pos: Any = None) -> str:
    return f"{value:g}"


def palette_png(png: bytes) -> bytes:
    """``png`` as a 256-colour palette PNG (the storage rule for figures): a plot has few flat
    colours and matplotlib's colour maps 256 levels, so the palette keeps what a reader sees at
    about a third of the bytes. A figure with transparent pixels, or whose palette version is
    not smaller, is returned unchanged. (Pillow is matplotlib's own PNG writer.)"""
    from PIL import Image

    im = Image.open(io.BytesIO(png))
    if im.mode not in ("RGB", "RGBA") or (im.mode == "RGBA" and im.getextrema()[3][0] < 255):
        return png
    out = io.BytesIO()
    im.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT).save(
        out, format="PNG", optimize=True
    )
    return out.getvalue() if out.tell() < len(png) else png


def save_plotly(fig: Any, path: str | Path) -> Path:
    """Write a plotly figure as JSON (the report embeds it with an offline plotly.js)."""
    return atomic_write_bytes(path, fig.to_json().encode())


def save_scatter(spec: dict[str, Any], path: str | Path) -> Path:
    """Write a scatter spec the report draws as inline SVG with a hover label per point:
    ``{"title", "axes": [names], "panels": [[i, j], ...], "series": [{"name", "color",
    "points": [[x, y, ...], ...], "labels": [str, ...]}]}``."""
    import json

    return atomic_write_bytes(path, json.dumps(spec, allow_nan=False).encode())
