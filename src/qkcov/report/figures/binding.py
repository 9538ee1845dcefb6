"""Binding-experiment figures (paper Figs. 8–10), drawn only from saved artifacts.

Everything is read from ``binding.json`` and ``binding.safetensors`` in ``out_dir``; each
``plot_*`` writes PNGs (and Fig. 8 also a plotly JSON) next to them and returns report
entries ``[{"file": <name relative to out_dir>, "caption": str}, ...]``.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ...artifacts import atomic_write_bytes, load_tensors, read_json  # noqa: E402
from .common import save_png  # noqa: E402

__all__ = ["plot_projections", "plot_swaps", "plot_attribution", "plot_all", "N_OBJECT_COLOURS"]

N_OBJECT_COLOURS = 8  # most frequent objects get colours, the rest are grey
_CONDITIONS = ("order", "lexical", "both")


def _load(out: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    info = read_json(out / "binding.json")
    tensors = {k: v.numpy() for k, v in load_tensors(out / "binding.safetensors").items()}
    return info, tensors


# ------------------------------------------------------------------ Fig. 8
def plot_projections(out_dir: str | Path) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Fig. 8: held-out keys (dots) and queries (crosses) in the order subspace coloured by
    order position, and in the lexical subspace coloured by bound / queried object."""
    out = Path(out_dir)
    info, t = _load(out)
    labels = info["projection_labels"]
    kpos, qpos = np.array(labels["key_position"]), np.array(labels["query_position"])
    kobj, qobj = labels["key_object"], labels["query_object"]
    top = [o for o, _ in Counter(kobj).most_common(N_OBJECT_COLOURS)]
    obj_code = {o: i for i, o in enumerate(top)}
    tab = plt.get_cmap("tab10")
    n_pos = int(max(kpos.max(), qpos.max())) + 1
    pos_cmap = plt.get_cmap("viridis")
    heads = info["heads"]
    fig, axes = plt.subplots(len(heads), 2, figsize=(10, 4.2 * len(heads)), squeeze=False)
    for hi, h in enumerate(heads):
        name = h["name"]
        # order subspace, coloured by position; position means joined in order
        ax = axes[hi, 0]
        pk, pq = t[f"{name}.proj.order.keys"], t[f"{name}.proj.order.queries"]
        colour_k = pos_cmap(kpos / max(n_pos - 1, 1))
        ax.scatter(pk[:, 0], pk[:, 1], c=colour_k, s=14, alpha=0.7, label="keys")
        ax.scatter(
            pq[:, 0], pq[:, 1], c=pos_cmap(qpos / max(n_pos - 1, 1)), marker="x", s=22, alpha=0.8
        )
        means = np.stack([pk[kpos == p].mean(0) for p in range(n_pos) if (kpos == p).any()])
        ax.plot(means[:, 0], means[:, 1], "k-o", lw=1.5, ms=4)
        for p, m in enumerate(means):
            ax.annotate(str(p + 1), m[:2], fontsize=9, xytext=(3, 3), textcoords="offset points")
        ax.set_title(
            f"{name} · order subspace (rank {h['rank_order']}): colour = position", fontsize=10
        )
        ax.set_xlabel("v1")
        ax.set_ylabel("v2")
        # lexical subspace, coloured by object
        ax = axes[hi, 1]
        pk, pq = t[f"{name}.proj.lexical.keys"], t[f"{name}.proj.lexical.queries"]
        ck = [tab(obj_code[o]) if o in obj_code else (0.75, 0.75, 0.75, 0.4) for o in kobj]
        cq = [tab(obj_code[o]) if o in obj_code else (0.75, 0.75, 0.75, 0.4) for o in qobj]
        ax.scatter(pk[:, 0], pk[:, 1], c=ck, s=14, alpha=0.7)
        ax.scatter(pq[:, 0], pq[:, 1], c=cq, marker="x", s=22, alpha=0.8)
        for o in top:
            ax.scatter([], [], color=tab(obj_code[o]), label=o, s=14)
        ax.legend(fontsize=7, loc="best", ncol=2, title="object", title_fontsize=7)
        ax.set_title(
            f"{name} · lexical subspace (rank {h['rank_lexical']}): colour = object", fontsize=10
        )
        ax.set_xlabel("v1")
        ax.set_ylabel("v2")
    fig.suptitle("Held-out letter keys (•) and queries (×) projected onto the ΔC subspaces")
    fig.tight_layout()
    save_png(fig, out / "fig8_projections.png")
    figures = [
        {
            "file": "fig8_projections.png",
            "caption": "Fig. 8 — held-out box-letter keys (dots) and query vectors (crosses) on the "
            "first two directions of each head's order-ID subspace (colour = order position, "
            "black line joins the position means 1→n) and lexical subspace (colour = the object "
            f"bound to the letter / asked about; the {N_OBJECT_COLOURS} most frequent objects).",
        }
    ]
    interactive: list[dict[str, str]] = []
    try:
        import plotly.graph_objects as go
    except ImportError:  # pragma: no cover - plotly is a dependency
        return figures, interactive
    name = heads[0]["name"]
    pk = t[f"{name}.proj.order.keys"]
    hover = [f"position {p + 1}, {o}" for p, o in zip(kpos.tolist(), kobj, strict=True)]
    traces = [
        go.Scatter3d(
            x=pk[:, 0], y=pk[:, 1], z=pk[:, 2], mode="markers", text=hover, name="keys",
            marker={"size": 3, "color": kpos, "colorscale": "Viridis", "colorbar": {"title": "pos"}},
        )
    ]  # fmt: skip
    means = np.stack([pk[kpos == p].mean(0) for p in range(n_pos) if (kpos == p).any()])
    traces.append(
        go.Scatter3d(
            x=means[:, 0], y=means[:, 1], z=means[:, 2], mode="lines+markers",
            line={"color": "black"}, marker={"size": 4, "color": "black"}, name="position means",
        )
    )  # fmt: skip
    pfig = go.Figure(traces)
    pfig.update_layout(
        title=f"{name}: letter keys in the order-ID key subspace (hover: position, object)",
        scene={"xaxis_title": "v1", "yaxis_title": "v2", "zaxis_title": "v3"},
    )
    atomic_write_bytes(out / "fig8_projections.plotly.json", pfig.to_json().encode())
    interactive.append(
        {
            "file": "fig8_projections.plotly.json",
            "caption": f"Fig. 8 (interactive) — {name}'s letter keys in the order-ID subspace.",
        }
    )
    return figures, interactive


# ------------------------------------------------------------------ Fig. 9
def plot_swaps(out_dir: str | Path, metric: str = "delta_p") -> list[dict[str, str]]:
    """Fig. 9: swap effect per subspace vs equal-rank random subspaces and the ceiling."""
    out = Path(out_dir)
    info, _ = _load(out)
    heads = info["heads"]
    fig, axes = plt.subplots(1, len(heads), figsize=(4.2 * len(heads), 3.6), squeeze=False)
    for hi, h in enumerate(heads):
        ax = axes[0, hi]
        conds = [c for c in _CONDITIONS if c in h["swap"]]
        x = np.arange(len(conds))
        vals = [h["swap"][c][metric] for c in conds]
        rmean = [h["random"][c][metric]["mean"] for c in conds]
        rstd = [h["random"][c][metric]["std"] for c in conds]
        ax.bar(x - 0.2, vals, 0.4, label="ΔC subspace", color="tab:blue")
        ax.bar(
            x + 0.2, rmean, 0.4, yerr=rstd, label="random (equal rank)", color="tab:gray", capsize=3
        )
        ax.axhline(h["ceiling"][metric], color="tab:red", ls="--", lw=1, label="full-key swap")
        ax.axhline(0, color="k", lw=0.5)
        ranks = {"order": h["rank_order"], "lexical": h["rank_lexical"], "both": h.get("rank_both")}
        ax.set_xticks(x, [f"{c}\n(r={ranks[c]})" for c in conds])
        ax.set_title(f"{h['name']} (n={h.get('swap_n', '?')})", fontsize=10)
        ax.set_ylabel(metric)
        if hi == 0:
            ax.legend(fontsize=7)
    fig.suptitle("Swapping the answer letter's key with another letter's key, in the forward pass")
    fig.tight_layout()
    save_png(fig, out / "fig9_swaps.png")
    return [
        {
            "file": "fig9_swaps.png",
            "caption": "Fig. 9 — change of p = a_tgt / (a_orig + a_tgt) after swapping the answer "
            "letter's key (orig) with another letter's key (target) inside the order, lexical "
            "and union ('both') key subspaces, vs random subspaces of equal rank (mean ± std) "
            "and the full-key swap (dashed).",
        }
    ]


# ------------------------------------------------------------------ Fig. 10
def plot_attribution(out_dir: str | Path) -> list[dict[str, str]]:
    """Fig. 10: per-token logit parts of one prompt (best head) and explained fractions."""
    out = Path(out_dir)
    info, t = _load(out)
    heads = info["heads"]
    h = heads[0]
    name = h["name"]
    parts, total = t[f"{name}.attribution.parts"], t[f"{name}.attribution.total"]
    ex = info["example"]
    tokens = [tok.replace("\n", "⏎") for tok in ex["tokens"]]
    names = info["attribution_priority"] + ["residual"]
    S = total.shape[0]
    first = 1 if S > 8 else 0  # the first token (BOS / sink) dwarfs the rest; shown in the title
    mat = np.concatenate([parts, total[None]], 0)[:, first:]
    fig = plt.figure(figsize=(min(max(8, 0.2 * S), 22), 7.5))
    ax = fig.add_subplot(3, 1, (1, 2))
    x = np.arange(first, S)
    width = 0.27
    for i, n in enumerate(names):
        ax.bar(x + (i - 1) * width, parts[i, first:], width, label=n)
    ax.plot(x, total[first:], "k.", label="total logit")
    for p in ex["letter_positions"]:
        ax.axvspan(p - 0.5, p + 0.5, color="gold", alpha=0.25, lw=0)
    ax.axvspan(
        ex["answer_position"] - 0.5, ex["answer_position"] + 0.5, color="orange", alpha=0.35, lw=0
    )
    ax.set_xticks(x, tokens[first:], rotation=90, fontsize=7)
    ax.set_ylabel("logit part (scaled q·k)")
    ax.legend(fontsize=8, ncol=4)
    skipped = f"; token 0 {tokens[0]!r} (total {total[0]:.1f}) not shown" if first else ""
    ax.set_title(
        f"{name}: logit of every key split into query parts (letters shaded, answer orange){skipped}",
        fontsize=9,
    )
    ax2 = fig.add_subplot(3, 2, 5)
    lim = float(np.abs(mat).max()) or 1.0
    ax2.imshow(mat, aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim)
    ax2.set_yticks(range(len(names) + 1), names + ["total"], fontsize=7)
    ax2.set_xticks([])
    ax2.set_title("same, as a heatmap", fontsize=9)
    ax3 = fig.add_subplot(3, 2, 6)
    bars = []
    for hh in heads:
        bars.append((hh["name"], hh["explained_fraction"], hh["explained_fraction_random"]))
        if "explained_fraction_centred" in hh:
            bars.append(
                (
                    hh["name"] + "\ncentred",
                    hh["explained_fraction_centred"],
                    hh["explained_fraction_centred_random"],
                )
            )
    xs = np.arange(len(bars))
    ax3.bar(xs - 0.2, [b[1] for b in bars], 0.4, label="order + lexical")
    ax3.bar(
        xs + 0.2,
        [b[2]["mean"] for b in bars],
        0.4,
        yerr=[b[2]["std"] for b in bars],
        color="tab:gray",
        label="random (same ranks)",
        capsize=3,
    )
    ax3.set_xticks(xs, [b[0] for b in bars], fontsize=7)
    ax3.set_ylabel("1 − ‖resid‖²/‖total‖²")
    ax3.set_title("explained fraction (held-out mean)", fontsize=9)
    ax3.legend(fontsize=7)
    fig.tight_layout()
    save_png(fig, out / "fig10_attribution.png")
    return [
        {
            "file": "fig10_attribution.png",
            "caption": "Fig. 10 — top: the attention logit of every key token of one held-out "
            f"prompt for {name}, split exactly into the query's part in the order subspace, its "
            "part in the lexical subspace (orthogonalised against the first), and the residual. "
            "Bottom right: explained fraction 1 − ‖resid‖²/‖total‖² over all key positions, "
            "averaged over held-out prompts (also after removing each part's mean over keys, "
            "which softmax ignores), vs random subspaces of the same ranks.",
        }
    ]


def plot_all(out_dir: str | Path) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """All binding figures; returns ``(figures, interactive)`` report entries."""
    figs, inter = plot_projections(out_dir)
    figs += plot_swaps(out_dir)
    figs += plot_attribution(out_dir)
    return figs, inter
