"""Toy-experiment figures (Fig. 2–5), drawn only from the artifacts the experiments saved.

Each ``plot_*`` reads its experiment's files in ``out_dir``, writes PNGs (and, for Fig. 3, a
scatter spec drawn as SVG by the report) next to them and returns the report entries
``[{"file": <name relative to out_dir>, "caption": str}, ...]``.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ...artifacts import load_tensors, read_json  # noqa: E402
from .common import save_png, save_scatter  # noqa: E402

__all__ = ["plot_ranks", "plot_projections", "plot_swap", "plot_interaction", "plot_all"]


# ------------------------------------------------------------------ Fig. 2
def _variant_label(row: dict) -> str:
    """``"binary"``, ``"gaussian"`` (sphere-normalised, the default) or ``"gaussian (raw)"``."""
    raw = row["variant"] == "gaussian" and row.get("latent_norm", "sphere") == "raw"
    return f"{row['variant']} (raw)" if raw else row["variant"]


def plot_ranks(out_dir: str | Path) -> list[dict[str, str]]:
    """Heatmaps of recovered rank per (N, M) cell from ``ranks.json`` → ``fig2_ranks.png``."""
    out = Path(out_dir)
    rows = read_json(out / "ranks.json")
    variants = sorted({_variant_label(r) for r in rows})
    ns = sorted({r["N"] for r in rows})
    ms = sorted({r["M"] for r in rows})
    fig, axes = plt.subplots(len(variants), 2, figsize=(7.5, 3.2 * len(variants)), squeeze=False)
    for vi, variant in enumerate(variants):
        cells = {(r["N"], r["M"]): r for r in rows if _variant_label(r) == variant}
        for fi, f in enumerate(("z1", "z2")):
            ax = axes[vi, fi]
            grid = np.full((len(ns), len(ms)), np.nan)
            for (n, m), r in cells.items():
                grid[ns.index(n), ms.index(m)] = r[f"rank_{f}"]
            ax.imshow(grid, cmap="viridis", vmin=0, vmax=max(ns + ms), origin="lower")
            for (n, m), r in cells.items():
                expected = n if f == "z1" else m
                ok = r[f"rank_{f}"] == expected
                ax.text(
                    ms.index(m),
                    ns.index(n),
                    f"{r[f'rank_{f}']}\n({expected})" + ("" if ok else " ✗"),
                    ha="center",
                    va="center",
                    color="white" if ok else "red",
                    fontsize=9,
                )
            ax.set_xticks(range(len(ms)), [str(m) for m in ms])
            ax.set_yticks(range(len(ns)), [str(n) for n in ns])
            ax.set_xlabel("M = dim z2")
            ax.set_ylabel("N = dim z1")
            ax.set_title(f"{variant}: rank of ΔC({f})")
    fig.suptitle("Recovered rank (expected in brackets)")
    fig.tight_layout()
    save_png(fig, out / "fig2_ranks.png", dpi=130)
    return [
        {
            "file": "fig2_ranks.png",
            "caption": "Fig. 2 — rank of the sampled ΔC(z1), ΔC(z2) at the energy threshold for "
            "every (N, M) cell; the analytic prediction (in brackets) is N and M.",
        }
    ]


# ------------------------------------------------------------------ Fig. 3
def _value_codes(z: np.ndarray) -> tuple[np.ndarray, bool]:
    """Integer code per latent row (binary: vertex index) and whether the latent is binary."""
    binary = bool(np.all(np.isin(z, (-1.0, 1.0))))
    if binary:
        bits = (z > 0).astype(int)
        return bits @ (1 << np.arange(z.shape[1])), True
    return np.zeros(len(z), dtype=int), False


def _vertex_means(points: np.ndarray, codes: np.ndarray) -> dict[int, np.ndarray]:
    return {int(c): points[codes == c].mean(0) for c in np.unique(codes)}


def _edges(codes: list[int]) -> list[tuple[int, int]]:
    """Pairs of vertex codes differing in exactly one bit (hypercube edges)."""
    return [
        (a, b) for a, b in itertools.combinations(sorted(codes), 2) if bin(a ^ b).count("1") == 1
    ]


def plot_projections(out_dir: str | Path) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Fig. 3 from ``projections.safetensors`` → ``fig3_projections.png`` + a scatter spec."""
    out = Path(out_dir)
    t = {k: v.numpy() for k, v in load_tensors(out / "projections.safetensors").items()}
    panels = [
        ("q_z1", "z1", "queries · z1 subspace"),
        ("k_z1", "z1", "keys · z1 subspace"),
        ("q_z2", "z2", "queries · z2 subspace"),
        ("k_z2", "z2", "keys · z2 subspace"),
    ]
    fig = plt.figure(figsize=(11, 10))
    cmap = plt.get_cmap("tab20")
    for pi, (name, latent, title) in enumerate(panels):
        pts = t[name][:, :3]
        codes, binary = _value_codes(t[latent])
        dim3 = pts.shape[1] >= 3
        ax = fig.add_subplot(2, 2, pi + 1, projection="3d" if dim3 else None)
        colour = cmap(codes % 20) if binary else t[latent][:, 0]
        coords = [pts[:, j] for j in range(min(3, pts.shape[1]))]
        if len(coords) == 1:
            coords.append(np.zeros_like(coords[0]))
        ax.scatter(*coords, c=colour, s=4, alpha=0.5)
        if binary:
            means = _vertex_means(pts, codes)
            for a, b in _edges(list(means)):
                seg = np.stack([means[a], means[b]])
                ax.plot(
                    *[seg[:, j] for j in range(len(coords))]
                    if seg.shape[1] >= len(coords)
                    else [seg[:, 0], np.zeros(2)],
                    color="k",
                    lw=1,
                )
        ax.set_title(title + ("" if binary else f" (colour: {latent}[0])"), fontsize=10)
    fig.suptitle("Projections onto the contrastive subspaces (first 3 coordinates)")
    save_png(fig, out / "fig3_projections.png", dpi=80)  # thousands of points: small
    figures = [
        {
            "file": "fig3_projections.png",
            "caption": "Fig. 3 — queries and target keys projected onto the ΔC(z1) and ΔC(z2) "
            "subspaces; colours are latent values, black lines join key/query means of latent "
            "values one coordinate apart (hypercube edges for binary latents).",
        }
    ]
    interactive = []
    pts = t["k_z1"]
    if pts.shape[1] >= 3:
        codes, binary = _value_codes(t["z1"])
        keep = np.arange(len(pts))[:1500]  # bounded: the PNG shows every point
        if binary:
            labels = ["z1 = " + "".join("+" if v > 0 else "-" for v in row) for row in t["z1"]]
            groups = sorted(set(codes[keep].tolist()))
            sel_of = {g: keep[codes[keep] == g] for g in groups}
            names = {g: labels[int(sel_of[g][0])] for g in groups}
        else:
            labels = [f"z1[0] = {row[0]:.3g}" for row in t["z1"]]
            sign = t["z1"][keep, 0] > 0
            sel_of = {0: keep[~sign], 1: keep[sign]}
            names = {0: "z1[0] ≤ 0", 1: "z1[0] > 0"}
        cmap = plt.get_cmap("tab20")
        series = [
            {
                "name": names[g],
                "color": matplotlib.colors.to_hex(cmap(gi % 20)),
                "points": [[float(f"{v:.4g}") for v in row] for row in pts[sel, :3].tolist()],
                "labels": [labels[int(i)] for i in sel],
            }
            for gi, (g, sel) in enumerate(sel_of.items())
            if len(sel)
        ]
        save_scatter(
            {
                "title": "Target keys in the z1 key subspace (hover: the key's z1 value)",
                "axes": ["v1", "v2", "v3"],
                "panels": [[0, 1], [0, 2], [1, 2]],
                "series": series,
            },
            out / "fig3_projections.scatter.json",
        )
        interactive.append(
            {
                "file": "fig3_projections.scatter.json",
                "caption": "Fig. 3 (interactive) — keys in the z1 key subspace, three pairs of "
                "its top directions (hover a point for its latent value).",
            }
        )
    return figures, interactive


# ------------------------------------------------------------------ Fig. 4
def plot_swap(out_dir: str | Path) -> list[dict[str, str]]:
    """Fig. 4 from ``swap.json`` → ``fig4_swap.png`` (attention after the swap, per subspace)."""
    out = Path(out_dir)
    info = read_json(out / "swap.json")
    rows = info["rows"]
    conditions = list(dict.fromkeys(r["condition"] for r in rows))
    fig, axes = plt.subplots(1, len(conditions), figsize=(4.2 * len(conditions), 3.6), sharey=True)
    axes = np.atleast_1d(axes)
    for ax, cond in zip(axes, conditions, strict=True):
        sel = [r for r in rows if r["condition"] == cond]
        x = np.arange(len(sel))
        for off, key, label, colour in (
            (-0.2, "attn_orig_after", "i_orig", "tab:blue"),
            (0.2, "attn_target_after", "i_target", "tab:orange"),
        ):
            ax.bar(
                x + off,
                [r[key] for r in sel],
                width=0.4,
                color=colour,
                label=label,
                yerr=[r[f"{key}_std"] for r in sel],
                capsize=3,
            )
        ax.set_xticks(
            x,
            [r["subspace"] + (f"\n(r={r['rank']})" if r["rank"] else "") for r in sel],
            fontsize=8,
        )
        ax.set_title(f"i_target differs in {cond}")
        ax.set_ylim(0, 1.05)
    axes[0].set_ylabel("mean attention after swap")
    axes[0].legend(fontsize=8)
    fig.suptitle("Swapping i_orig / i_target key coordinates inside a subspace")
    fig.tight_layout()
    save_png(fig, out / "fig4_swap.png", dpi=130)
    return [
        {
            "file": "fig4_swap.png",
            "caption": f"Fig. 4 — mean attention on the original target (i_orig) and the swap "
            f"partner (i_target) after swapping their keys inside each subspace; random = "
            f"mean ± std over {info['n_random']} random subspaces of equal rank.",
        }
    ]


# ------------------------------------------------------------------ Fig. 5
def plot_interaction(out_dir: str | Path) -> list[dict[str, str]]:
    """Fig. 5 from ``interaction.safetensors`` → ``fig5_interaction.png``."""
    out = Path(out_dir)
    info = read_json(out / "interaction.json")
    G = load_tensors(out / "interaction.safetensors")["G"].numpy()
    N, M = info["config"]["n_z1"], info["config"]["n_z2"]
    labels = [f"z1[{i}]" for i in range(N)] + [f"z2[{i}]" for i in range(M)]
    lim = float(np.abs(G).max()) or 1.0
    fig, ax = plt.subplots(figsize=(1.0 + 0.45 * (N + M), 0.8 + 0.45 * (N + M)))
    im = ax.imshow(G, cmap="RdBu_r", vmin=-lim, vmax=lim)
    ax.axhline(N - 0.5, color="k", lw=1)
    ax.axvline(N - 0.5, color="k", lw=1)
    ax.set_xticks(range(N + M), labels, rotation=90, fontsize=8)
    ax.set_yticks(range(N + M), labels, fontsize=8)
    ax.set_xlabel("key latent (W_K A)")
    ax.set_ylabel("query latent (W_Q B)")
    ax.set_title(
        f"G = (W_Q B)ᵀ(W_K A); off-block energy {info['off_block_fraction']:.1%}", fontsize=9
    )
    fig.colorbar(im, ax=ax, shrink=0.8)
    fig.tight_layout()
    save_png(fig, out / "fig5_interaction.png", dpi=130)
    return [
        {
            "file": "fig5_interaction.png",
            "caption": "Fig. 5 — latent interaction matrix G: query latents (rows) against key "
            "latents (columns); a block-diagonal G means z1 matches z1 and z2 matches z2.",
        }
    ]


def plot_all(out_dir: str | Path) -> list[dict[str, str]]:
    """Redraw every toy figure whose artifacts exist under ``out_dir`` (searched recursively)."""
    out = Path(out_dir)
    made: list[dict[str, str]] = []
    for name, fn in (
        ("ranks.json", plot_ranks),
        ("projections.safetensors", plot_projections),
        ("swap.json", plot_swap),
        ("interaction.json", plot_interaction),
    ):
        for path in sorted(out.rglob(name)):
            res = fn(path.parent)
            entries = res[0] + res[1] if isinstance(res, tuple) else res
            made += [{**e, "file": str(path.parent / e["file"])} for e in entries]
    return made
