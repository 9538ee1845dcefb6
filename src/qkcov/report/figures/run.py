"""Figures of a pipeline run, drawn only from ``run.json`` + ``run.safetensors``.

Each ``plot_*`` writes its files next to the artifacts and returns report entries
``[{"file": <name relative to out_dir>, "caption": str}]``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ...artifacts import load_tensors, read_json
from .common import plt, save_plotly, save_png

__all__ = [
    "plot_scan",
    "plot_scree",
    "plot_projections",
    "plot_swaps",
    "plot_attribution",
    "plot_causal_rank",
    "plot_all",
]

Entries = list[dict[str, str]]


def _load(out: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    return read_json(out / "run.json"), load_tensors(out / "run.safetensors")


def plot_scan(out: Path, info: dict[str, Any]) -> Entries:
    """Layers × heads heatmap of the scan's mean attention difference (positives − negatives)."""
    scan = info.get("scan")
    if not scan:
        return []
    L = max(r["layer"] for r in scan) + 1
    H = max(r["head"] for r in scan) + 1
    m = np.full((L, H), np.nan)
    for r in scan:
        m[r["layer"], r["head"]] = r["diff"]
    lim = float(np.nanmax(np.abs(m))) or 1.0
    fig, ax = plt.subplots(figsize=(2.5 + 0.35 * H, 1.6 + 0.16 * L))
    im = ax.imshow(m, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto", origin="lower")
    for h in info["heads"]:
        ax.add_patch(
            plt.Rectangle((h["head"] - 0.5, h["layer"] - 0.5), 1, 1, fill=False, ec="black", lw=1.5)
        )
    ax.set(xlabel="head", ylabel="layer", title="query attention: positive − negative keys")
    fig.colorbar(im, ax=ax, shrink=0.8)
    save_png(fig, out / "scan.png")
    return [
        {
            "file": "scan.png",
            "caption": "Head scan on build records: mean attention from the query to positive minus negative keys (boxes: studied heads).",
        }
    ]


def plot_scree(out: Path, info: dict[str, Any], t: dict[str, Any]) -> Entries:
    """Singular values of each pooled ΔC, with the permutation null's 5–95 % band."""
    heads = info["heads"]
    feats = [f["name"] for f in info["features"]]
    fig, axes = plt.subplots(1, len(heads), figsize=(3.6 * len(heads), 3.0), squeeze=False)
    for ax, h in zip(axes[0], heads, strict=True):
        for fi, f in enumerate(feats):
            sv = t[f"{h['name']}.{f}.pooled.singular_values"].numpy()
            k = min(len(sv), 16)
            x = np.arange(1, k + 1)
            color = f"C{fi}"
            ax.plot(x, sv[:k], "o-", color=color, ms=3, label=f)
            sig = h["features"][f]["groups"]["pooled"].get("significance") or {}
            band = sig.get("null_band")
            if band:
                lo, hi = np.asarray(band[0])[:k], np.asarray(band[1])[:k]
                ax.fill_between(x, lo, hi, color=color, alpha=0.2, label=f"{f} null 5–95 %")
            r = h["features"][f]["groups"]["pooled"]["rank"]
            if r:
                ax.axvline(r + 0.5, color=color, ls=":", lw=1)
        ax.set(title=h["name"], xlabel="index", ylabel="singular value of ΔC")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    save_png(fig, out / "scree.png")
    return [
        {
            "file": "scree.png",
            "caption": "Singular values of each feature's pooled ΔC (log scale); shaded: the permutation null's 5–95 % band of the same index; dotted: the rank in force.",
        }
    ]


def plot_projections(out: Path, info: dict[str, Any], t: dict[str, Any]) -> tuple[Entries, Entries]:
    """Held-out keys (and queries) on each feature's top directions; 3-D plotly for the best head."""
    heads = [h for h in info["heads"] if h["projections"]]
    if not heads:
        return [], []
    feats = [f for f in info["features"] if f["name"] in heads[0]["projections"]]
    fig, axes = plt.subplots(
        len(heads), 2 * len(feats), figsize=(3.2 * 2 * len(feats), 3.0 * len(heads)), squeeze=False
    )
    for row, h in zip(axes, heads, strict=True):
        for fi, f in enumerate(feats):
            name = f["name"]
            p = f"{h['name']}.{name}.proj."
            keys, queries = t[p + "keys"].numpy(), t[p + "queries"].numpy()
            pos = t[p + "key_positive"].numpy().astype(bool)
            pr = h["projections"][name]
            klab, qlab = np.array(pr["key_labels"]), np.array(pr["query_labels"])
            groups = sorted({g for g in qlab if g}) or [""]
            for ax, pts, labels, what in (
                (row[2 * fi], keys, klab, "keys"),
                (row[2 * fi + 1], queries, qlab, "queries"),
            ):
                if what == "keys":
                    ax.scatter(pts[~pos, 0], pts[~pos, 1], s=6, c="lightgray", label="negative")
                sel_all = pos if what == "keys" else np.ones(len(pts), bool)
                for gi, g in enumerate(groups):
                    sel = sel_all & (labels == g) if g else sel_all
                    ax.scatter(
                        pts[sel, 0], pts[sel, 1], s=8, color=f"C{gi % 10}", label=g or "positive"
                    )
                ax.set(title=f"{h['name']} {name}: {what}", xlabel="dir 1", ylabel="dir 2")
                if len(groups) <= 8:
                    ax.legend(fontsize=6)
    fig.tight_layout()
    save_png(fig, out / "projections.png")
    entries = [
        {
            "file": "projections.png",
            "caption": "Held-out keys (positive keys coloured by their record's group, negatives grey) and queries projected on each feature's top key / query directions (fitted on build records).",
        }
    ]
    inter: Entries = []
    try:
        import plotly.graph_objects as go
    except ImportError:  # pragma: no cover - plotly is a dependency
        return entries, inter
    best = next((h for h in heads if h["name"] == info.get("best_head")), heads[0])
    name = feats[0]["name"]
    p = f"{best['name']}.{name}.proj."
    keys = t[p + "keys"].numpy()
    pos = t[p + "key_positive"].numpy().astype(bool)
    klab = np.array(best["projections"][name]["key_labels"])
    pf = go.Figure()
    for g in sorted(set(klab[pos])) + ["negative"]:
        sel = ~pos if g == "negative" else pos & (klab == g)
        pf.add_trace(
            go.Scatter3d(
                x=keys[sel, 0],
                y=keys[sel, 1],
                z=keys[sel, 2],
                mode="markers",
                marker={"size": 3},
                name=g or "positive",
            )
        )
    pf.update_layout(
        title=f"{best['name']} {name}: held-out keys (3-D)",
        height=480,
        margin={"l": 0, "r": 0, "t": 40, "b": 0},
    )
    save_plotly(pf, out / "projections.plotly.json")
    inter.append(
        {
            "file": "projections.plotly.json",
            "caption": f"Interactive: {best['name']}'s held-out keys in the {name} key subspace's top 3 directions.",
        }
    )
    return entries, inter


def plot_swaps(out: Path, info: dict[str, Any]) -> Entries:
    """Δp per condition vs its equal-rank random subspaces and the full-key ceiling."""
    heads = [h for h in info["heads"] if not h["swaps"]["skipped"]]
    if not heads:
        return []
    fig, axes = plt.subplots(
        1,
        len(heads),
        figsize=(
            0.9 + 1.2 * max(len(h["swaps"]["conditions"]) + 1 for h in heads) * len(heads),
            3.2,
        ),
        squeeze=False,
    )
    for ax, h in zip(axes[0], heads, strict=True):
        conds = h["swaps"]["conditions"]
        names = list(conds)
        x = np.arange(len(names) + 1)
        vals = [conds[n]["delta_p"] for n in names] + [h["swaps"]["ceiling"]["delta_p"]]
        rnd = [conds[n]["random"]["delta_p"]["mean"] for n in names] + [np.nan]
        rsd = [conds[n]["random"]["delta_p"]["std"] for n in names] + [0]
        ci = [conds[n].get("ci") or {} for n in names]
        err = np.array(
            [
                [max(v - c["delta_p"][0], 0), max(c["delta_p"][1] - v, 0)]
                if c.get("delta_p") and None not in c["delta_p"]
                else [0, 0]
                for v, c in zip(vals, ci, strict=False)
            ]
            + [[0, 0]]
        ).T
        ax.bar(
            x - 0.2,
            vals,
            0.4,
            yerr=err,
            label="subspace / full key",
            color=["C0"] * len(names) + ["C7"],
        )
        ax.bar(x + 0.2, rnd, 0.4, yerr=rsd, label="random, equal rank", color="C1")
        ax.set_xticks(x, [f"{n}\n(r={conds[n]['rank']})" for n in names] + ["full key"], fontsize=7)
        ax.axhline(0, color="black", lw=0.5)
        ax.set(title=f"{h['name']} (n={h['swaps']['n']})", ylabel="Δp = Δ a_t/(a_o+a_t)")
        ax.legend(fontsize=7, loc="best", framealpha=0.6)
    fig.tight_layout()
    save_png(fig, out / "swaps.png")
    return [
        {
            "file": "swaps.png",
            "caption": "In-forward key swaps on held-out records: change of p = a_target/(a_orig+a_target) when the most-attended positive key and a negative key exchange their coordinates in each subspace (95 % paired-bootstrap CI), against random subspaces of equal rank (mean ± std) and the full-key swap.",
        }
    ]


def plot_attribution(out: Path, info: dict[str, Any], t: dict[str, Any]) -> Entries:
    """Per-token logit parts of the first held-out prompt for the best head."""
    best = next((h for h in info["heads"] if h["name"] == info.get("best_head")), None)
    if (
        best is None
        or best["attribution"]["skipped"]
        or f"{best['name']}.attribution.parts" not in t
    ):
        return []
    parts = t[f"{best['name']}.attribution.parts"].numpy()
    total = t[f"{best['name']}.attribution.total"].numpy()
    names = best["attribution"]["names"]
    tokens = best["attribution"]["example_tokens"] or [str(i) for i in range(len(total))]
    S = len(total)
    fig, ax = plt.subplots(figsize=(min(2 + 0.22 * S, 18), 3.2))
    x = np.arange(S)
    pos_base, neg_base = np.zeros(S), np.zeros(S)
    for i, n in enumerate(names):
        v = parts[i]
        base = np.where(v >= 0, pos_base, neg_base)
        ax.bar(x, v, 0.8, bottom=base, label=n, color=f"C{i}" if n != "residual" else "lightgray")
        pos_base += np.clip(v, 0, None)
        neg_base += np.clip(v, None, 0)
    ax.plot(x, total, "k.", ms=4, label="logit")
    ax.set_xticks(x, [tok.replace("\n", "\\n") for tok in tokens[:S]], rotation=90, fontsize=6)
    ax.set(
        ylabel="logit part",
        title=f"{best['name']}: exact logit attribution (first held-out prompt)",
    )
    ax.legend(fontsize=7, ncol=len(names) + 1)
    save_png(fig, out / "attribution.png")
    return [
        {
            "file": "attribution.png",
            "caption": "Each logit q·k_j of the query over the prompt's tokens split exactly into the parts carried by each feature's query subspace (later features orthogonalised against earlier ones) and the residual; dots: the logits.",
        }
    ]


def plot_causal_rank(out: Path, info: dict[str, Any]) -> Entries:
    """Per head: the causal rank curve Δp(r) with its CI, both baselines, the causal rank."""
    entries = []
    for h in info["heads"]:
        cr = h.get("causal_rank") or h["swaps"].get("causal_rank")
        if not cr or not cr.get("curve"):
            continue
        c = cr["curve"]
        r = np.array([p["r"] for p in c])
        dp = np.array([p["delta_p"] for p in c])
        lo = np.array([np.nan if None in (p["ci"] or [None]) else p["ci"][0] for p in c], float)
        hi = np.array([np.nan if None in (p["ci"] or [None]) else p["ci"][1] for p in c], float)
        fig, ax = plt.subplots(figsize=(4.6, 3.0))
        ax.fill_between(r, lo, hi, color="C0", alpha=0.2, lw=0, label="95 % CI (prompts)")
        ax.plot(r, dp, "o-", color="C0", ms=3, label="ΔC key subspace, rank r")
        ax.plot(r, [p["random_mean"] for p in c], "s--", color="C1", ms=3, label="random, rank r")
        if any(p.get("permuted_mean") is not None for p in c):
            pm = [np.nan if p.get("permuted_mean") is None else p["permuted_mean"] for p in c]
            ax.plot(r, pm, "^--", color="C2", ms=3, label="label-permuted, rank r")
        if cr.get("rank"):
            ax.axvline(cr["rank"], color="black", lw=0.8, ls=":")
            ax.annotate(f"causal rank {cr['rank']}", (cr["rank"], np.nanmax(dp)), fontsize=7,
                        xytext=(4, -10), textcoords="offset points")  # fmt: skip
        ax.axhline(0, color="black", lw=0.5)
        ax.set(xlabel="rank r", ylabel="swap Δp", title=f"{h['name']}: causal rank curve")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize=6, loc="best", framealpha=0.6)
        name = f"causal_rank_{h['name']}.png"
        save_png(fig, out / name)
        entries.append({
            "file": name,
            "caption": f"{h['name']}: swap Δp in the top-r key subspace of ΔC ({cr['feature']}) for r = 1..{cr['R']} "
            f"(95 % paired-bootstrap CI over held-out prompts), against random and label-permuted subspaces of "
            f"each rank; causal rank = smallest r reaching {cr['fraction']:.0%} of the curve's best"
            + (f" ({cr['note']})" if cr.get("note") else "") + ".",
        })  # fmt: skip
    return entries


def plot_all(out_dir: str | Path) -> tuple[Entries, Entries]:
    out = Path(out_dir)
    info, t = _load(out)
    figs = plot_scan(out, info) + plot_scree(out, info, t)
    proj, inter = plot_projections(out, info, t)
    figs += proj + plot_swaps(out, info) + plot_causal_rank(out, info)
    figs += plot_attribution(out, info, t)
    return figs, inter
