"""Figures are stored as 256-colour palette PNGs that look like the rendered plot."""

from __future__ import annotations

import io
import tempfile

import numpy as np
from PIL import Image

from qkcov.report.figures.common import _decade_label, palette_png, plt, save_png


def _plot() -> bytes:
    fig, (a, b) = plt.subplots(1, 2, figsize=(6, 3))
    rng = np.random.default_rng(0)
    im = a.imshow(rng.standard_normal((12, 9)), cmap="RdBu_r")  # a 256-level colour map
    fig.colorbar(im, ax=a)
    b.plot(np.arange(20), rng.standard_normal(20).cumsum(), label="Δp")
    b.scatter(rng.standard_normal(200), rng.standard_normal(200), s=4, alpha=0.4)
    b.legend()
    b.set_title("singular values")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _rgb(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)


def test_palette_png_is_smaller_and_looks_the_same():
    raw = _plot()
    small = palette_png(raw)
    assert Image.open(io.BytesIO(small)).mode == "P"
    assert len(small) < 0.6 * len(raw)
    d = np.abs(_rgb(small) - _rgb(raw))
    assert d.shape == _rgb(raw).shape
    # on a 0-255 scale: almost every pixel exact, a few anti-aliased edges off by a few levels
    assert d.mean() < 0.5 and np.percentile(d, 99) <= 8, (d.mean(), np.percentile(d, 99))


def test_transparent_figure_is_kept_as_is(tmp_path):
    im = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    assert palette_png(buf.getvalue()) == buf.getvalue()
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    path = save_png(fig, tmp_path / "f.png")
    assert Image.open(path).mode == "P"


def test_log_axes_label_decades_in_one_plain_style():
    """Log axes: every decade labelled alike (0.1 … 1000 written out, 10ⁿ beyond; no TeX),
    nothing between decades; an axis spanning under two decades also labels its 2s and 5s."""
    assert [_decade_label(v) for v in (0.01, 0.1, 1, 10, 1000, 1e4, 1e6)] == [
        "10⁻²", "0.1", "1", "10", "1000", "10⁴", "10⁶"
    ]  # fmt: skip
    assert [_decade_label(v) for v in (2, 50, 0, -10, float("nan"))] == [""] * 5
    for lo, hi, labelled in ((3, 20, True), (5, 5e5, False)):
        fig, ax = plt.subplots()
        ax.plot([lo, hi], [lo, hi])
        ax.set_yscale("log")
        ax.set_ylim(lo, hi)
        with tempfile.TemporaryDirectory() as d:
            save_png(fig, f"{d}/f.png")
        minor = [t.get_text() for t in ax.yaxis.get_minorticklabels() if t.get_text()]
        assert bool(minor) == labelled, (lo, hi, minor)
        assert all("$" not in t.get_text() for t in ax.yaxis.get_majorticklabels())
