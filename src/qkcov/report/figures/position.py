"""Rotary-band profile figure of each head, drawn only from ``run.json``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .common import plt, save_png

__all__ = ["plot_rotary"]


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
                xlabel="pair wavelength (tokens; square: non-rotary dims)",
                title=f"{h['name']} {side} subspace",
            )
            ax.legend(fontsize=7)
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
                "non-rotary).",
            }
        )
    return entries
