"""Filter-head figures (head scan, Fig. 6 projections, Fig. 7 swaps).

Drawn only from ``filter.json`` and ``filter.safetensors`` in ``out_dir``. Each ``plot_*``
writes its files next to them and returns report entries
``[{"file": <name relative to out_dir>, "caption": str}, ...]``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ...artifacts import atomic_write_bytes, load_tensors, read_json  # noqa: E402
from .common import save_png  # noqa: E402

__all__ = ["plot_scan", "plot_projection", "plot_swaps", "plot_all"]

Entries = list[dict[str, str]]


def _load(out: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    return read_json(out / "filter.json"), load_tensors(out / "filter.safetensors")


def plot_scan(out_dir: str | Path) -> Entries:
    """Heatmap layers × heads of the scan's attention difference → ``filter_scan.png``."""
    out = Path(out_dir)
    info, tensors = _load(out)
    diff = tensors["scan.diff"].numpy()
    top = tensors["scan.top_match"].numpy()
    L, H = diff.shape
    fig, axes = plt.subplots(1, 2, figsize=(2.2 + 0.9 * H, 1.5 + 0.18 * L), squeeze=False)
    lim = float(np.nanmax(np.abs(diff))) or 1.0
    panels = [
        (diff, "mean attn: asked-category − other items", "RdBu_r", -lim, lim),
        (top, "most-attended item is of asked category", "viridis", 0.0, 1.0),
    ]
    for ax, (m, title, cmap, lo, hi) in zip(axes[0], panels, strict=True):
        im = ax.imshow(m, cmap=cmap, vmin=lo, vmax=hi, aspect="auto", origin="lower")
        for h in info["heads"]:
            ax.add_patch(
                plt.Rectangle(
                    (h["head"] - 0.5, h["layer"] - 0.5), 1, 1, fill=False, ec="black", lw=1.5
                )
            )
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_xticks(range(H))
        ax.set_title(title, fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.05)
    fig.suptitle(f"Head scan ({info['model']['name']}); boxes = studied heads", fontsize=10)
    fig.tight_layout()
    save_png(fig, out / "filter_scan.png")
    return [
        {
            "file": "filter_scan.png",
            "caption": "Head scan over every layer and head: mean last-token attention on items "
            "of the asked category minus other items (left) and how often the most-attended item "
            "is of the asked category (right). Boxes mark the studied heads.",
        }
    ]


def _colors(names: list[str]) -> dict[str, Any]:
    cmap = plt.get_cmap("tab20" if len(names) > 10 else "tab10")
    return {n: cmap(i % cmap.N) for i, n in enumerate(names)}


def plot_projection(out_dir: str | Path) -> tuple[Entries, Entries]:
    """Fig. 6: held-out keys/queries on the top-3 category-subspace directions of each head.

    Writes ``fig6_projections.png`` and ``fig6_projections.plotly.json`` (best head, 3-D).
    """
    out = Path(out_dir)
    info, tensors = _load(out)
    heads = info["heads"]
    labels = info["projection"]["labels"]
    kcat, qcat = labels["key_category"], labels["query_category"]
    names = sorted(set(kcat) | set(qcat))
    colors = _colors(names)
    fig = plt.figure(figsize=(9.5, 4.2 * len(heads)))
    for i, h in enumerate(heads):
        keys = tensors[f"{h['name']}.proj.keys"].numpy()
        qs = tensors[f"{h['name']}.proj.queries"].numpy()
        for j, (pts, cats, what) in enumerate(((keys, kcat, "keys"), (qs, qcat, "queries"))):
            ax = fig.add_subplot(len(heads), 2, 2 * i + j + 1, projection="3d")
            for c in names:
                sel = np.array([x == c for x in cats])
                if sel.any():
                    ax.scatter(*pts[sel].T, s=6, color=colors[c], label=c, alpha=0.7)
            acc = h["cluster_acc"]
            sub = (
                f"\nNC acc {acc['subspace']:.2f} (random {acc['random']:.2f}, PCA {acc['pca']:.2f})"
                if what == "keys"
                else "\ncoloured by asked category"
            )
            ax.set_title(f"{h['name']} {what}{sub}", fontsize=9)
            ax.tick_params(labelsize=6)
        if i == 0:
            fig.axes[0].legend(
                fontsize=6, markerscale=2, loc="upper left", bbox_to_anchor=(-0.3, 1.0)
            )
    fig.suptitle("Fig. 6 — held-out keys/queries in the category subspace (top 3 directions)")
    fig.tight_layout()
    save_png(fig, out / "fig6_projections.png")

    import plotly.graph_objects as go

    best = next(h for h in heads if h["name"] == info["best_head"])
    keys = tensors[f"{best['name']}.proj.keys"].numpy()
    words = [f"{c}" for c in kcat]
    traces = []
    for c in names:
        sel = np.array([x == c for x in kcat])
        if not sel.any():
            continue
        r, g, b, _ = colors[c]
        traces.append(
            go.Scatter3d(
                x=keys[sel, 0].tolist(),
                y=keys[sel, 1].tolist(),
                z=keys[sel, 2].tolist(),
                mode="markers",
                name=c,
                text=[words[k] for k in np.nonzero(sel)[0]],
                marker={"size": 3, "color": f"rgb({int(r * 255)},{int(g * 255)},{int(b * 255)})"},
            )
        )
    pfig = go.Figure(traces)
    pfig.update_layout(
        title=f"{best['name']}: held-out keys in the category subspace (top 3)",
        scene={"xaxis_title": "dir 1", "yaxis_title": "dir 2", "zaxis_title": "dir 3"},
        height=600,
    )
    atomic_write_bytes(out / "fig6_projections.plotly.json", pfig.to_json().encode())
    figs = [
        {
            "file": "fig6_projections.png",
            "caption": "Fig. 6 — keys (item last tokens, coloured by the item's category) and "
            "queries (coloured by the asked category) of held-out prompts projected on the "
            "top-3 energy-ordered directions of the union of per-category key/query subspaces. NC acc = nearest-centroid category "
            "accuracy in these 3 dimensions (centroids from build keys).",
        }
    ]
    inter = [
        {
            "file": "fig6_projections.plotly.json",
            "caption": f"Fig. 6 (interactive) — {best['name']}, held-out keys in 3-D.",
        }
    ]
    return figs, inter


def plot_swaps(out_dir: str | Path) -> Entries:
    """Fig. 7: swap Δp and item-flip rate per head and condition → ``fig7_swaps.png``."""
    out = Path(out_dir)
    info, _ = _load(out)
    heads = info["heads"]
    metrics = [("delta_p", "Δp = Δ a_tgt/(a_orig+a_tgt)"), ("flip_items", "flip rate (items)")]
    fig, axes = plt.subplots(1, 2, figsize=(4 + 2.2 * len(heads), 3.6), squeeze=False)
    conds = [
        ("union", "#1f77b4"),
        ("random union", "#aaaaaa"),
        ("pooled", "#2ca02c"),
        ("random pooled", "#dddddd"),
        ("full key", "#333333"),
    ]
    width = 0.16
    x = np.arange(len(heads))
    for ax, (m, label) in zip(axes[0], metrics, strict=True):
        for ci, (cond, color) in enumerate(conds):
            vals, errs = [], []
            for h in heads:
                if cond == "union":
                    vals.append(h["swap_union"][m])
                    errs.append(0.0)
                elif cond == "pooled":
                    vals.append(h["swap_pooled"][m])
                    errs.append(0.0)
                elif cond == "random union":
                    vals.append(h["random_union"][m]["mean"])
                    errs.append(h["random_union"][m]["std"])
                elif cond == "random pooled":
                    vals.append(h["random_pooled"][m]["mean"])
                    errs.append(h["random_pooled"][m]["std"])
                else:
                    vals.append(h["ceiling"][m])
                    errs.append(0.0)
            ax.bar(
                x + (ci - 2) * width, vals, width, yerr=errs, color=color, label=cond,
                capsize=2, edgecolor="black", linewidth=0.4,
            )  # fmt: skip
        ax.axhline(0, color="black", lw=0.6)
        ax.set_xticks(
            x, [h["name"] + ("*" if h["name"] == info["best_head"] else "") for h in heads]
        )
        ax.set_ylabel(label)
    axes[0, 0].legend(fontsize=7)
    ranks = ", ".join(f"{h['name']}: r={h['rank']['union']}/{h['rank']['pooled']}" for h in heads)
    fig.suptitle(
        f"Fig. 7 — key swaps on held-out prompts (rank category/pooled: {ranks})", fontsize=9
    )
    fig.tight_layout()
    save_png(fig, out / "fig7_swaps.png")
    return [
        {
            "file": "fig7_swaps.png",
            "caption": "Fig. 7 — swapping the most-attended asked-category item's key with a random "
            "other item's key inside the category subspace (union of per-category key subspaces) "
            "and the pooled subspace, vs random orthonormal subspaces of equal rank (mean ± std) "
            "and the full-key swap (ceiling). * = best head.",
        }
    ]


def plot_all(out_dir: str | Path) -> tuple[Entries, Entries]:
    """Every filter figure: ``(png entries, interactive entries)``."""
    figs = plot_scan(out_dir)
    pfigs, inter = plot_projection(out_dir)
    figs += pfigs
    figs += plot_swaps(out_dir)
    return figs, inter
