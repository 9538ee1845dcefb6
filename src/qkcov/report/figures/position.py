"""Rotary-band profile figure of each head, drawn only from ``run.json``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .common import LEGEND_FONTSIZE, plt, save_png

__all__ = ["plot_rotary", "plot_offsets"]


def plot_offsets(out: Path, info: dict[str, Any]) -> list[dict[str, str]]:
    """Query–key offsets of positive vs negative keys, one panel per feature (pooled)."""
    offsets = (info.get("position") or {}).get("offsets") or {}
    feats = [(f, g["pooled"]) for f, g in offsets.items() if g.get("pooled", {}).get("histogram")]
    if not feats:
        return []
    fig, axes = plt.subplots(1, len(feats), figsize=(3.6 * len(feats), 2.8), squeeze=False)
    for ax, (f, t) in zip(axes[0], feats, strict=True):
        h = t["histogram"]
        x = np.asarray(h["offset"], dtype=float)
        for side, color in (("pos", "C3"), ("neg", "C0")):
            c = np.asarray(h[side], dtype=float)
            ax.bar(x, c / max(c.sum(), 1), width=0.9, alpha=0.5, color=color,
                   label=f"{'positive' if side == 'pos' else 'negative'} keys")  # fmt: skip
        p = t.get("p_value")
        flag = " — confounded" if t.get("confounded") else ""
        ax.set(xlabel="query − key offset (tokens)", ylabel="share of keys",
               title=f"{f}: AUC {t['auc'] if t['auc'] is None else round(t['auc'], 2)}, "
               f"p {'–' if p is None else f'{p:.1g}'}{flag}")  # fmt: skip
        ax.title.set_fontsize(8)
        ax.legend(fontsize=LEGEND_FONTSIZE)
    save_png(fig, out / "offsets.png")
    return [
        {
            "file": "offsets.png",
            "caption": "Query–key offsets of positive and negative build keys per feature "
            "(Mann–Whitney p and AUC = P(offset⁺ > offset⁻); 0.5 = balanced).",
        }
    ]


def plot_rotary(out: Path, info: dict[str, Any]) -> list[dict[str, str]]:
    """Per head: the share of each pooled subspace's energy in every rotary pair, against the
    pair's wavelength (query and key side), non-rotary dims as a separate point."""
    entries = []
    for h in info.get("heads", []):
        pos = h.get("position") or {}
        prof, rot = pos.get("rotary_profile"), pos.get("rotary")
        if not prof or not rot:
            continue
        wl = np.asarray(rot["wavelengths"])
        fig, axes = plt.subplots(1, 2, figsize=(8.4, 3.0), sharey=True)
        drawn = False
        for ax, side in zip(axes, ("query", "key"), strict=True):
            for fi, (f, groups) in enumerate(prof.items()):
                p = (groups.get("pooled") or {}).get(side)
                if not p:
                    continue
                drawn = True
                label = f"{f} (index {p['positional_index']:.2f})"
                ax.plot(wl, p["pairs"], "o-", ms=3, color=f"C{fi}", label=label)
                if p["non_rotary"] > 0:
                    ax.plot([wl.max() * 3], [p["non_rotary"]], "s", color=f"C{fi}")
            ax.set_xscale("log")
            ax.set(
                xlabel="pair wavelength (tokens)",
                title=f"{h['name']} {side} subspace",
            )
            ax.legend(fontsize=LEGEND_FONTSIZE)
        axes[0].set_ylabel("share of subspace energy")
        if not drawn:
            plt.close(fig)
            continue
        name = f"rotary_{h['name']}.png"
        save_png(fig, out / name)
        entries.append(
            {
                "file": name,
                "caption": f"{h['name']}: rotary-band profile of each feature's pooled subspace "
                f"({pos.get('frame', 'post')} frame). Short wavelengths (left) carry position, "
                "long ones (right) are nearly position-free; the positional index is the "
                "energy-weighted normalised log-frequency (1 = fastest pair, 0 = slowest or "
                "non-rotary; squares at the right: the non-rotary dims of a partial rotary).",
            }
        )
    return entries
