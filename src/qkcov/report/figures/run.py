"""Figures of a pipeline run, drawn only from ``run.json`` + ``run.safetensors``.

:func:`plot_scan` draws the layers × heads scan; :func:`plot_head` draws one studied head's
story (where it attends, the scree, the swap against its baselines, the projections as a
hover-labelled scatter spec, the token view's data). Each writes its files next to the
artifacts and returns report entries ``{"file": <name relative to out_dir>, "caption": str}``.
Positive keys are blue, negative keys red, the query green in every figure (``common.py``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from ...artifacts import atomic_write_bytes, load_tensors, read_json
from ...naming import tensor_prefix
from .common import (
    GROUP_COLOURS,
    LEGEND_FONTSIZE,
    NEGATIVE,
    OTHER,
    POSITIVE,
    QUERY,
    plt,
    save_png,
    save_scatter,
)

__all__ = ["plot_scan", "plot_head", "plot_heads", "plot_all", "token_view_data", "NO_TOKEN_VIEW"]

Entries = list[dict[str, str]]

NO_TOKEN_VIEW = (
    "Token view unavailable: this run's artifacts hold no per-prompt data (run.json has no "
    "'token_view' for this head — saved before token views existed, or without held-out swap "
    "records); rerun to get it."
)


def _load(out: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    return read_json(out / "run.json"), load_tensors(out / "run.safetensors")


def _safe(name: str) -> str:
    """A head name as a file-name part (head names are ``L<n>H<n>``; anything else mapped)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", name)


def _headline(h: dict[str, Any]) -> str | None:
    return h.get("swap_condition") or (h.get("swaps") or {}).get("headline")


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
    save_png(fig, out / "scan.png", dpi=100)
    return [
        {
            "file": "scan.png",
            "caption": "Head scan on build records: mean attention from the query to positive minus negative keys (boxes: studied heads).",
        }
    ]


# ------------------------------------------------------------------ token view
def token_view_data(h: dict[str, Any], t: dict[str, Any]) -> dict[str, Any] | None:
    """The head's token view as one JSON-able object (numbers rounded), or ``None``."""
    tv = h.get("token_view")
    p = f"{h['name']}.token_view."
    if not tv or not tv.get("prompts") or p + "attn_before" not in t:
        return None
    before = t[p + "attn_before"].numpy()
    after = t[p + "attn_after"].numpy() if p + "attn_after" in t else None
    logit = t[p + "logit"].numpy()
    parts = t[p + "parts"].numpy() if p + "parts" in t else None

    def r(x: np.ndarray) -> list[float]:
        return [float(f"{v:.5g}") for v in x.tolist()]

    prompts = []
    for pr in tv["prompts"]:
        s = slice(pr["offset"], pr["offset"] + pr["length"])
        prompts.append(
            {
                **{k: pr[k] for k in ("record", "line", "tokens", "query", "positives", "negatives", "orig", "target")},
                "before": r(before[s]),
                "after": None if after is None else r(after[s]),
                "logit": r(logit[s]),
                "parts": None if parts is None else [r(row[s]) for row in parts],
            }
        )  # fmt: skip
    return {
        "head": h["name"],
        "condition": tv.get("condition"),
        "after_reason": tv.get("after_reason"),
        "cap": tv.get("cap"),
        "n_eligible": tv.get("n_eligible"),
        "max_tokens": tv.get("max_tokens"),
        "part_names": tv.get("part_names") or [],
        "prompts": prompts,
    }


def _plot_attends(out: Path, h: dict[str, Any], view: dict[str, Any]) -> Entries:
    """Mean attention mass of the query on positive keys, negative keys, itself and the rest,
    before and after the headline swap (the token view's prompts)."""
    rows = {"before": [], "after": []}
    for pr in view["prompts"]:
        for when in rows:
            a = pr[when]
            if a is None:
                continue
            a = np.asarray(a)
            pos, neg = pr["positives"], pr["negatives"]
            rest = np.ones(len(a), bool)
            rest[pos + neg + [pr["query"]]] = False
            rows[when].append([a[pos].sum(), a[neg].sum(), a[pr["query"]], a[rest].sum()])
    labels = ["positive keys", "negative keys", "query token", "other tokens"]
    colours = [POSITIVE, NEGATIVE, QUERY, OTHER]
    fig, ax = plt.subplots(figsize=(5.4, 2.8))
    whens = [w for w in rows if rows[w]]
    x = np.arange(len(labels))
    width = 0.8 / len(whens)
    for wi, when in enumerate(whens):
        m = np.mean(rows[when], axis=0)
        ax.bar(
            x + (wi - (len(whens) - 1) / 2) * width, m, width, color=colours,
            alpha=1.0 if when == "before" else 0.45, hatch=None if when == "before" else "//",
            edgecolor="black", lw=0.4,
        )  # fmt: skip
    ax.set_xticks(x, labels, fontsize=8)
    ax.set(ylabel="mean attention mass", ylim=(0, 1))
    cond = view.get("condition")
    ax.set_title(
        f"{h['name']}: where the query attends"
        + (f" (solid: before, hatched: after swapping in {cond})" if len(whens) > 1 else ""),
        fontsize=9,
    )
    name = f"{_safe(h['name'])}.attends.png"
    save_png(fig, out / name, dpi=100)
    return [
        {
            "file": name,
            "caption": f"Where {h['name']} attends: the query's attention summed over the record's positive keys, negative keys, the query token itself and all other tokens, mean over the token view's {len(view['prompts'])} held-out prompts"
            + (f"; hatched: after swapping the most-attended positive and a negative key inside the {cond} key subspace." if len(whens) > 1 else "."),
        }
    ]  # fmt: skip


def _plot_scree(out: Path, info: dict[str, Any], h: dict[str, Any], t: dict[str, Any]) -> Entries:
    """Every singular value of each feature's pooled ΔC up to well beyond its ranks, with the
    null of the rank rule in force shaded and the ranks marked.

    Under the null rule (the whitened sequential deflated permutation test) the spectrum is
    the whitened one the test reads, and the band is each step's deflated null (5–95 %, its
    (1 − α) quantile marked): the comparisons that set the rank. Under the energy rule there
    is no null, so no band; runs saved before step nulls were kept show the raw spectrum
    and the raw per-index null, said as such."""
    feats = [f["name"] for f in info["features"] if f["name"] in h["features"]]
    fig, ax = plt.subplots(figsize=(5.4, 3.0))
    causal = (h.get("causal_rank") or {}).get("rank")
    shown, whitened, raw_band = 0, False, False
    alpha = (info.get("config") or {}).get("alpha", 0.05)
    for fi, f in enumerate(feats):
        pooled = h["features"][f]["groups"]["pooled"]
        sig = pooled.get("significance") or {}
        r, r_e = pooled["rank"], pooled["rank_energy"]
        colour = GROUP_COLOURS[fi % len(GROUP_COLOURS)]
        step_band, wsv = sig.get("step_null_band"), sig.get("whitened_singular_values")
        if pooled["rank_rule"] == "null" and step_band and wsv:
            whitened = True
            sv = np.asarray(wsv, dtype=float)
            k = min(len(sv), max(16, max(r, causal or 0) + 12))
            x = np.arange(1, k + 1)
            ax.plot(x, np.maximum(sv[:k], 1e-300), "o-", color=colour, ms=2.5, lw=1,
                    label=f"{f}: whitened ΔC")  # fmt: skip
            band = np.asarray(step_band, dtype=float)
            nb = min(k, band.shape[1])
            ax.fill_between(x[:nb], band[0][:nb], band[1][:nb], color=colour, alpha=0.18,
                            label=f"{f}: step null 5–95 %")  # fmt: skip
            ax.plot(x[:nb], band[2][:nb], "_", color=colour, ms=9, mew=1.5,
                    label=f"{f}: step null {1 - alpha:.0%} quantile")  # fmt: skip
        else:
            key = tensor_prefix(h["name"], f, "pooled") + "singular_values"
            if key not in t:
                continue
            sv = t[key].numpy()
            k = min(len(sv), max(16, max(r, r_e, causal or 0) + 12))
            x = np.arange(1, k + 1)
            ax.plot(x, np.maximum(sv[:k], 1e-300), "o-", color=colour, ms=2.5, lw=1,
                    label=f"{f}: ΔC")  # fmt: skip
            band = sig.get("null_band")
            if band and pooled["rank_rule"] == "null":  # a run saved before step nulls
                raw_band = True
                nb = min(k, len(band[0]))
                ax.fill_between(x[:nb], band[0][:nb], band[1][:nb], color=colour, alpha=0.18,
                                label=f"{f}: raw per-index null 5–95 %")  # fmt: skip
        shown = max(shown, k)
        if r:
            ax.axvline(r + 0.5, color=colour, ls=":", lw=1.2,
                       label=f"{f}: rank {r} ({pooled['rank_rule']})")  # fmt: skip
        if r_e and r_e != r:
            ax.axvline(r_e + 0.5, color=colour, ls="-.", lw=0.9, label=f"{f}: energy rank {r_e}")
    if causal:
        ax.axvline(causal + 0.5, color="black", ls="--", lw=0.9, label=f"causal rank {causal}")
    what = "whitened singular values" if whitened else "singular values"
    ax.set(title=f"{h['name']}: {what} of ΔC", xlabel="index", ylabel=what)
    ax.set_yscale("log")
    ax.legend(fontsize=LEGEND_FONTSIZE, loc="upper left", bbox_to_anchor=(1.01, 1.0),
              borderaxespad=0)  # fmt: skip
    name = f"{_safe(h['name'])}.scree.png"
    save_png(fig, out / name, dpi=100)
    if whitened:
        shade = (
            "the rank rule's null: at each step k of the sequential deflated test, the top "
            "singular value of the label-permuted ΔCs, whitened like the data and with the first "
            f"k − 1 observed directions projected out (5–95 %; bar: the {1 - alpha:.0%} quantile "
            "the k-th value must exceed), drawn for the steps the test took"
        )
    elif raw_band:
        shade = "the raw permutation null's 5–95 % band of each index (not the whitened test that set the rank)"
    else:
        shade = "nothing: the energy rule has no null"
    return [
        {
            "file": name,
            "caption": f"{what.capitalize()} of each feature's pooled ΔC (log scale; the first {shown}); shaded: {shade}; dotted: the rank in force, dash-dotted: the 99 %-energy rank, dashed: the causal rank (the headline).",
        }
    ]  # fmt: skip


def _plot_swaps(out: Path, h: dict[str, Any]) -> Entries:
    """Δp of every condition vs its equal-rank random subspaces and the full-key ceiling."""
    sw = h["swaps"]
    if sw.get("skipped") or not sw["conditions"]:
        return []
    conds = sw["conditions"]
    names = list(conds)
    head_cond = _headline(h)
    x = np.arange(len(names) + 1)
    vals = [conds[n]["delta_p"] for n in names] + [
        sw["ceiling"]["delta_p"] if sw["ceiling"] else np.nan
    ]
    rnd = [conds[n]["random"]["delta_p"]["mean"] for n in names] + [np.nan]
    rsd = [conds[n]["random"]["delta_p"]["std"] for n in names] + [0]
    prm = [((conds[n].get("permuted") or {}).get("delta_p") or {}) for n in names] + [{}]
    has_perm = any(prm)
    err = []
    for v, n in zip(vals, [*names, None], strict=True):
        ci = ((conds[n].get("ci") or {}).get("delta_p") if n else None) or (
            ((sw["ceiling"] or {}).get("ci") or {}).get("delta_p") if n is None else None
        )
        err.append([max(v - ci[0], 0), max(ci[1] - v, 0)] if ci and None not in ci else [0, 0])
    fig, ax = plt.subplots(figsize=(1.6 + 1.0 * len(x), 3.0))
    colours = ["#333333" if n == head_cond else "#7f7f7f" for n in names] + ["#c7c7c7"]
    w = 0.27 if has_perm else 0.4
    ax.bar(
        x - w,
        vals,
        w,
        yerr=np.array(err).T,
        color=colours,
        label="subspace swap (95 % CI); dark: headline",
    )
    ax.bar(
        x,
        rnd,
        w,
        yerr=rsd,
        color="#fdb863",
        label="random subspaces, equal rank (mean ± sd)",
    )
    if has_perm:
        ax.bar(
            x + w,
            [d.get("mean", np.nan) for d in prm],
            w,
            yerr=[d.get("std", 0) for d in prm],
            color="#80cdc1",
            label="label-permuted subspaces, equal rank (mean ± sd)",
        )
    ax.set_xticks(x, [f"{n}\n(r={conds[n]['rank']})" for n in names] + ["full key"], fontsize=7)
    ax.axhline(0, color="black", lw=0.5)
    ax.set(title=f"{h['name']}: key swaps (n={sw['n']})", ylabel="Δp")
    ax.legend(
        fontsize=LEGEND_FONTSIZE,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.28),
        ncol=1,
        frameon=False,
    )
    name = f"{_safe(h['name'])}.swaps.png"
    save_png(fig, out / name, dpi=100)
    return [
        {
            "file": name,
            "caption": "In-forward key swaps on held-out records: Δp, the mean change of p = a_target/(a_orig+a_target) when the most-attended positive key and a negative key exchange their coordinates inside each key subspace (95 % paired-bootstrap CI), against random subspaces of equal rank, subspaces estimated the same way from label-permuted build records, and the full-key swap (the ceiling).",
        }
    ]  # fmt: skip


_ONE = {"keys": "key", "queries": "query"}


def _scatter(out: Path, h: dict[str, Any], t: dict[str, Any]) -> Entries:
    """Held-out keys (and queries) on the first projected feature's top directions, as a
    scatter spec with one hover label (token, JSONL line, group) per point."""
    if not h["projections"]:
        return []
    f = next(iter(h["projections"]))
    pr = h["projections"][f]
    p = tensor_prefix(h["name"], f) + "proj."
    if p + "keys" not in t:
        return []
    keys, queries = t[p + "keys"].numpy(), t[p + "queries"].numpy()
    pos = t[p + "key_positive"].numpy().astype(bool)
    klab, qlab = pr["key_labels"], pr["query_labels"]
    knames = pr.get("key_names") or [f"key {i}" for i in range(len(keys))]
    qnames = pr.get("query_names") or [f"query {i}" for i in range(len(queries))]
    groups = sorted({g for g, ps in zip(klab, pos, strict=True) if ps and g})
    dims = keys.shape[1]

    def pts(a: np.ndarray, sel: np.ndarray) -> list[list[float]]:
        return [[float(f"{v:.4g}") for v in row] for row in a[sel].tolist()]

    def series(
        name: str,
        colour: str,
        a: np.ndarray,
        sel: np.ndarray,
        names: list[str],
        what: str,
        labels: list[str],
    ) -> dict[str, Any]:
        return {
            "name": name, "color": colour, "points": pts(a, sel), "panel_set": what,
            "labels": [f"{_ONE[what]} {names[i]}" + (f" · group {labels[i]}" if labels[i] else "")
                       for i in np.flatnonzero(sel)],
        }  # fmt: skip

    # colour = the record's group (one colour per group in every panel); filled: positive
    # keys, hollow: negative keys, so both sides and the groups show in one plot
    kgroups = pr.get("key_groups") or []
    kgroups = kgroups if len(kgroups) == len(keys) else []
    groups = sorted({g for g in [*qlab, *kgroups] if g} | set(groups))
    colour = {g: GROUP_COLOURS[gi % len(GROUP_COLOURS)] for gi, g in enumerate(groups)}
    labels = kgroups or klab
    ser = []
    if len(groups) > 1:
        for g in groups:
            ser.append(series(f"positive keys: {g}", colour[g], keys,
                              pos & (np.array(klab) == g), knames, "keys", labels))  # fmt: skip
        if kgroups:
            for g in groups:
                neg = series(f"negative keys: {g}", colour[g], keys,
                             ~pos & (np.array(kgroups) == g), knames, "keys", labels)  # fmt: skip
                neg["hollow"] = True
                ser.append(neg)
        else:  # a run saved before negative keys kept their group
            ser.append(series("negative keys", NEGATIVE, keys, ~pos, knames, "keys", labels))
        for g in groups:
            ser.append(series(f"queries: {g}", colour[g], queries, np.array(qlab) == g,
                              qnames, "queries", qlab))  # fmt: skip
    else:
        ser.append(series("negative keys", NEGATIVE, keys, ~pos, knames, "keys", labels))
        ser.append(series("positive keys", POSITIVE, keys, pos, knames, "keys", klab))
        ser.append(
            series("queries", QUERY, queries, np.ones(len(queries), bool), qnames, "queries", qlab)
        )
    ser = [x for x in ser if x["points"]]
    spec = {
        "title": f"{h['name']} · {f}: held-out keys and queries on the subspace's top directions",
        "axes": [f"dir {i + 1}" for i in range(dims)],
        "panels": [[0, 1], [0, 2]] if dims >= 3 else [[0, 1]] if dims == 2 else [[0, 0]],
        "sets": {"keys": "keys (key subspace)", "queries": "queries (query subspace)"},
        "series": ser,
    }  # fmt: skip
    name = f"{_safe(h['name'])}.projections.scatter.json"
    save_scatter(spec, out / name)
    return [
        {
            "file": name,
            "caption": f"Held-out keys on the {f} key subspace's top directions and queries on its query subspace's, fitted on build records (hover a point: its token and JSONL line).",
        }
    ]


def _plot_causal_rank(out: Path, h: dict[str, Any]) -> Entries:
    """The causal rank curve Δp(r) with its CI, both baselines and the causal rank."""
    entries = []
    for hd in [h]:
        cr = hd.get("causal_rank") or hd["swaps"].get("causal_rank")
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
        ax.legend(fontsize=LEGEND_FONTSIZE, loc="best", framealpha=0.6)
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


def plot_head(
    out: Path, info: dict[str, Any], h: dict[str, Any], t: dict[str, Any]
) -> dict[str, Any]:
    """One head's figures: ``{"figures", "scatter", "token_view" (file or None),
    "token_view_reason" (None or one line)}``."""
    import json

    view = token_view_data(h, t)
    figs: Entries = []
    tv_file, reason = None, None
    if view is not None:
        figs += _plot_attends(out, h, view)
        tv_file = f"{_safe(h['name'])}.tokenview.json"
        atomic_write_bytes(
            out / tv_file, json.dumps(view, ensure_ascii=False, allow_nan=False).encode()
        )
    else:
        reason = NO_TOKEN_VIEW
    figs += _plot_scree(out, info, h, t) + _plot_swaps(out, h) + _plot_causal_rank(out, h)
    return {
        "figures": figs,
        "scatter": _scatter(out, h, t),
        "token_view": tv_file,
        "token_view_reason": reason,
    }


def plot_heads(out_dir: str | Path) -> tuple[Entries, dict[str, dict[str, Any]]]:
    """The scan figure and every studied head's figures (see :func:`plot_head`)."""
    out = Path(out_dir)
    info, t = _load(out)
    # names from records (a group "$\\frac{a}$") are drawn as text, never parsed as TeX
    with plt.rc_context({"text.parse_math": False}):
        return plot_scan(out, info), {h["name"]: plot_head(out, info, h, t) for h in info["heads"]}


def plot_all(out_dir: str | Path) -> tuple[Entries, Entries]:
    """Every figure file of the run (scan + per head) and the scatter specs, flat."""
    scan, heads = plot_heads(out_dir)
    figs = scan + [f for v in heads.values() for f in v["figures"]]
    return figs, [s for v in heads.values() for s in v["scatter"]]
