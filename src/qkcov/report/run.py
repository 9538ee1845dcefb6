"""Report section of a pipeline run, from ``run.json`` (+ figures from the artifacts)."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..artifacts import read_json
from ..results import format_p, headline_of, headline_p
from .html import write_section

__all__ = ["write_run_section", "head_rows"]


def _f(x: Any, nd: int = 3) -> Any:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return round(float(x), nd)


def _pm(d: dict[str, Any] | None, nd: int = 3) -> str:
    return "–" if not d else f"{d['mean']:.{nd}f} ± {d['std']:.{nd}f}"


def _ci(c: dict[str, Any] | None, metric: str) -> str:
    ci = (c or {}).get("ci") or {}
    if not ci.get(metric) or None in ci[metric]:
        return "–"
    return f"[{ci[metric][0]:.3f}, {ci[metric][1]:.3f}]"


def head_rows(info: dict[str, Any]) -> list[list[Any]]:
    """One row per head: rank, significance, swap effect vs random, attribution."""
    rows = []
    for h in info["heads"]:
        sig = h.get("significance") or {}
        avail = sig.get("available", False)
        sw = h["swaps"]
        c = sw["conditions"].get(sw["headline"] or "")
        att = h["attribution"]
        groups = (sw["headline"] or "").endswith(":groups")  # pooled CI/stability do not apply
        hl = headline_of(h)
        rows.append(
            [
                h["name"],
                f"{hl.rank} ({hl.rule})",
                hl.condition or "–",
                sig.get("rank_null", "–") if avail else "–",
                sig.get(
                    "rank_energy",
                    h["features"][next(iter(h["features"]))]["groups"]["pooled"]["rank_energy"],
                ),
                _f(headline_p(h)) if avail else "–",
                (
                    f"[{sig['rank_ci'][0]}, {sig['rank_ci'][1]}]"
                    if avail and sig.get("rank_ci") and not groups
                    else "–"
                ),
                _f(sig.get("stability_deg"), 1) if avail and not groups else "–",
                "skipped" if c is None else _f(c["delta_p"]),
                _ci(c, "delta_p"),
                "–" if c is None else _pm(c["random"]["delta_p"]),
                "–" if c is None else format_p(c.get("p_value"), c.get("p_floor")),
                "–" if c is None else _pm((c.get("permuted") or {}).get("delta_p")),
                "–" if c is None else format_p(c.get("p_permuted"), c.get("p_permuted_floor")),
                "–" if sw["ceiling"] is None else _f(sw["ceiling"]["delta_p"]),
                "–" if c is None else _f(c["flip_items"]),
                "–" if c is None or c.get("logprob_shift") is None else _f(c["logprob_shift"]),
                "skipped" if att["skipped"] else _f(att["explained_fraction"]),
                "–" if att["skipped"] else _f(att["random"]["mean"]),
            ]
        )
    return rows


HEAD_COLUMNS = [
    "head", "headline rank", "condition", "rank (null)", "rank (energy)", "p (ΔC)", "null rank 95% CI", "stability (deg)", "Δp swap", "Δp 95% CI",
    "Δp random", "p vs random", "Δp permuted", "p vs permuted", "Δp full key", "flip rate", "log-prob shift", "explained", "explained (random)",
]  # fmt: skip


def _condition_rows(info: dict[str, Any]) -> list[list[Any]]:
    rows = []
    for h in info["heads"]:
        sw = h["swaps"]
        for name, c in sw["conditions"].items():
            rows.append(
                [h["name"], name, c["rank"], _f(c["delta_p"]), _ci(c, "delta_p"), _pm(c["random"]["delta_p"]),
                 format_p(c.get("p_value"), c.get("p_floor")), _pm((c.get("permuted") or {}).get("delta_p")),
                 format_p(c.get("p_permuted"), c.get("p_permuted_floor")),
                 _f(c["flip_items"]), _f(c.get("logprob_shift")), _ci(c, "logprob_shift")]
            )  # fmt: skip
        if sw["ceiling"]:
            rows.append(
                [
                    h["name"],
                    "full key",
                    sw["ceiling"]["rank"],
                    _f(sw["ceiling"]["delta_p"]),
                    _ci(sw["ceiling"], "delta_p"),
                    "–",
                    "–",
                    "–",
                    "–",
                    _f(sw["ceiling"]["flip_items"]),
                    _f(sw["ceiling"].get("logprob_shift")),
                    "–",
                ]
            )
    return rows


def _subspace_rows(info: dict[str, Any]) -> list[list[Any]]:
    """One row per group with a significance result (and the pooled ΔC); groups whose test
    is unavailable for the same reason are collapsed into one summary row."""

    def span(vals: list[Any]) -> Any:
        vals = [v for v in vals if v != "–"]
        if not vals:
            return "–"
        lo, hi = min(vals), max(vals)
        return lo if lo == hi else f"{lo}–{hi}"

    rows = []
    for h in info["heads"]:
        for fname, f in h["features"].items():
            collapsed: dict[str, list[tuple[str, dict[str, Any]]]] = {}
            for g, s in f["groups"].items():
                sig = s.get("significance") or {}
                if g != "pooled" and not sig.get("available"):
                    # one row per reason; the record counts show as the n columns' range
                    why = re.sub(r"\s*\(n=\d+\)", "", sig.get("reason") or "no significance test")
                    collapsed.setdefault(why, []).append((g, s))
                    continue
                rows.append(
                    [h["name"], fname, g, s["rank"], s["rank_energy"], s["n_pos"], s["n_neg"],
                     _f(sig.get("p_value")) if sig.get("available") else (sig.get("reason") or "–"),
                     _f(s["singular_values"][0], 4) if s["singular_values"] else "–"]
                )  # fmt: skip
            for reason, items in collapsed.items():
                names = [g for g, _ in items]
                shown = ", ".join(names[:4]) + (", …" if len(names) > 4 else "")
                ss = [s for _, s in items]
                rows.append(
                    [h["name"], fname, f"{len(items)} group{'s' if len(items) != 1 else ''} ({shown})",
                     span([s["rank"] for s in ss]), span([s["rank_energy"] for s in ss]),
                     span([s["n_pos"] for s in ss]), span([s["n_neg"] for s in ss]),
                     f"unavailable: {reason}",
                     span([_f(s["singular_values"][0], 4) if s["singular_values"] else "–" for s in ss])]
                )  # fmt: skip
    return rows


def head_lead(h: dict[str, Any]) -> str:
    """A neutral one-line summary of one head from its saved numbers (used when the run
    holds no verdict)."""
    sig = h.get("significance") or {}
    cr = h.get("causal_rank") or {}
    if cr.get("rank"):
        null = sig.get("rank_null")
        bits = [f"causal rank {cr['rank']} (null rank {'–' if null is None else null}"]
    else:
        bits = [f"rank {h['rank']} ({h.get('rank_rule', '')} rule"]
    if sig.get("rank_energy") is not None:
        bits[0] += f"; 99 %-energy rank {sig['rank_energy']}"
    bits[0] += ")"
    p = headline_p(h)
    if sig.get("available") and p is not None:
        bits.append(f"permutation p = {p:.3g}")
    sw = h.get("swaps") or {}
    cond = h.get("swap_condition") or sw.get("headline")
    c = (sw.get("conditions") or {}).get(cond or "")
    if c is None:
        bits.append(f"swaps skipped ({sw.get('skipped') or 'no headline condition'})")
    else:
        rnd = (c.get("random") or {}).get("delta_p") or {}
        s = f"swapping keys inside the {cond} subspace moves Δp = {c['delta_p']:.3f}"
        if rnd:
            s += f" vs {rnd['mean']:.3f} ± {rnd['std']:.3f} for random rank-{c['rank']} subspaces"
        if c.get("p_value") is not None:
            s += f" (p = {c['p_value']:.3g})"
        if sw.get("ceiling"):
            s += f"; full key {sw['ceiling']['delta_p']:.3f}"
        bits.append(s)
    att = h.get("attribution") or {}
    if not att.get("skipped") and att.get("explained_fraction") is not None:
        ef = att["explained_fraction"]
        if not (isinstance(ef, float) and math.isnan(ef)):
            bits.append(
                f"its query subspaces explain {ef:.3f} of the held-out logits (random {(att.get('random') or {}).get('mean', float('nan')):.3f})"
            )
    return f"{h['name']}: " + "; ".join(bits) + "."


def records_source(info: dict[str, Any]) -> str:
    """The records file's name (``provenance.records.path``), or ``"<n> records"`` for a
    run on records passed in memory (a notebook, a built-in task)."""
    path = ((info.get("provenance") or {}).get("records") or {}).get("path")
    return Path(str(path)).name if path else f"{info.get('n_records', 0)} records"


def run_title(info: dict[str, Any], title: str | None = None) -> str:
    """The section (and, for one run, the page) title: what was run, on which records file,
    for which feature(s)."""
    feats = [f["name"] for f in info.get("features") or []]
    head = f"{title or 'Contrast analysis'} — {records_source(info)}"
    if feats == ["feature"]:  # the records named no feature (run.json's default name)
        return head
    what = "feature" if len(feats) == 1 else "features"
    return f"{head}, {what}: {', '.join(feats)}"


def rank_text(info: dict[str, Any]) -> str:
    """How the ranks were chosen, for the rules this run used (the method text)."""
    cfg = info["config"]
    if cfg["rank_rule"] == "null":
        rule = (
            "Subspace rank (rule in force: null): a whitened sequential deflated permutation "
            "test. The label-permuted ΔCs (the null) are centred and whitened (clipped), the "
            "observed ΔC the same way; step k compares the observed k-th whitened singular "
            "value with the top singular value of each null draw after the first k − 1 "
            "observed directions are projected out, and the rank is the number of steps "
            f"passed before the first with p ≥ α (α = {cfg['alpha']}; "
            f"{cfg['n_permutations']} permutations). The scree shows this whitened spectrum "
            "and each step's null."
        )
    else:
        rule = (
            f"Subspace rank (rule in force: energy): the smallest rank holding {cfg['energy']:.0%}"
            " of ΔC's squared singular values; no null is involved."
        )
    curve = next((h["causal_rank"] for h in info["heads"] if h.get("causal_rank")), None)
    if curve is None:
        head = (
            " The headline rank (the table, `qkcov export`) is the rank in force: this run "
            "measured no causal rank curve."
        )
    else:
        head = (
            " The headline rank, which the verdict, the swap, the label test, the table and "
            "`qkcov export` use, is the causal rank: the smallest r whose key-subspace swap "
            f"reaches {float(curve.get('fraction', 0.9)):.0%} of the best Δp of the causal "
            "rank curve over r = 1..R."
        )
    return (
        rule + " The energy rank is always shown beside it." + head + " run.json's "
        "head.headline names the headline's rank, rule and condition; the other ranks are "
        "listed by name."
    )


def write_run_section(
    out_dir: str | Path,
    *,
    key: str = "run",
    title: str | None = None,
    order: int = 50,
    text: Sequence[str] = (),
    extra_tables: Sequence[dict[str, Any]] = (),
    extra_figures: Sequence[dict[str, str]] = (),
) -> Path:
    """Draw the figures of ``out_dir``'s run and write its ``section.json``."""
    from .figures.run import plot_heads

    out = Path(out_dir)
    info = read_json(out / "run.json")
    figs, per_head = plot_heads(out)
    from .figures.position import plot_offsets, plot_rotary
    from .position import position_tables

    figs += plot_offsets(out, info)
    rotary = {f["file"]: f for f in plot_rotary(out, info)}
    blocks = []
    for h in info["heads"]:
        block = {"name": h["name"], "verdict": h.get("verdict"), "lead": head_lead(h)}
        block.update(per_head[h["name"]])
        tv = rotary.get(f"rotary_{h['name']}.png")
        if tv is not None:
            block["figures"] = [*block["figures"], tv]
        blocks.append(block)
    cfg = info["config"]
    feats = info["features"]
    best = next((h for h in info["heads"] if h["name"] == info.get("best_head")), None)
    source = records_source(info)
    summary: dict[str, Any] = {
        "model": info["model"],
        "records file": source,
        "records": info["n_records"],
        "features": ", ".join(
            f"{f['name']} ({len(f['groups'])} group{'s' if len(f['groups']) != 1 else ''})"
            for f in feats
        ),
        "heads": ", ".join(h["name"] for h in info["heads"]),
        "seconds": round(info["seconds"], 1),
    }
    if best is not None and best["swap"] is not None:
        summary["best head"] = best["name"]
        summary["Δp swap / random / full key"] = (
            f"{best['swap']['delta_p']:.3f} / {best['random']['delta_p']['mean']:.3f} / {best['ceiling']['delta_p']:.3f}"
        )
    body = list(text) or [
        f"{info['n_records']} contrast records; query = the record's query span (default: the last "
        "token); positive keys share the feature with the query, negative keys do not. "
        f"Records are split into build (ΔC, head scan) and held-out (projections, swaps, "
        f"attribution) sets (holdout {cfg['holdout']}, seed {cfg['seed']}, unless the records pin "
        "their split).",
    ]
    # one verdict per head, first: the same status and sentence as the CLI summary and run.json
    verdicts = [
        f"{h['name']}{' (best head)' if h['name'] == info.get('best_head') else ''} — verdict: "
        f"{h['verdict']['status']}. {h['verdict']['sentence']}"
        for h in info["heads"]
        if h.get("verdict")
    ]
    body = verdicts + body
    if info.get("scored_token"):
        body.append(f"The log-prob shift scores: {info['scored_token']}.")
    if info.get("answers"):
        a = info["answers"]
        body.append(
            f"Model accuracy on the records' answers ({a['n']} held-out records): top-1 "
            f"{a['top1']:.3f}, mean rank {a['mean_rank']:.2f} (1 = top)."
        )
    body += [
        "Label-permuted baselines: the same estimator on the permutation null's relabellings of "
        "the build records (sign flips within two-sided records, sides permuted across one-sided "
        f"ones; {cfg.get('n_permuted', 0)} relabellings), its top-r key subspace swapped on the same "
        "held-out pairs. The label-sensitive test (centroid patch) sets the negative key's "
        "coordinates in the headline subspace to the build positives' mean and the positive key's "
        "to the negatives' mean, minus the mirrored patch; with permuted labels the two means "
        "coincide in expectation, so only a subspace that holds the labels gives an effect.",
        rank_text(info),
        "Swaps exchange the most-attended positive key's and a negative key's coordinates inside a "
        "key subspace during the forward pass; Δp is the mean change of p = a_target/(a_orig+a_target), "
        f"against {cfg['n_random']} random subspaces of equal rank and the full-key swap. Flip rate: "
        "the share of prompts whose most-attended key among the record's keys is, after the "
        "swap, the negative (target) key; "
        "log-prob shift: the change of log p(target key's first token) − log p(orig key's first "
        "token) at the next-token prediction after the query.",
        "Attribution splits each held-out logit q·k exactly into the parts in each feature's query "
        "subspace and the residual; explained = 1 − ‖residual‖²/‖logits‖², against random subspaces "
        "of the same ranks.",
    ]  # fmt: skip
    body += list(info.get("notes") or [])
    noted = " ".join(info.get("notes") or [])
    for h in info["heads"]:
        if h["swaps"]["skipped"] and h["swaps"]["skipped"] not in noted:
            body.append(f"{h['name']}: swaps skipped — {h['swaps']['skipped']}.")
        if h["attribution"]["skipped"]:
            body.append(f"{h['name']}: attribution skipped — {h['attribution']['skipped']}.")
    tables = [
        {
            "caption": "Studied heads. Headline rank (its rule): the rank of the swap condition the verdict rests on — the first feature's pooled key subspace, or the union of its significant per-group subspaces (':groups') when the pooled ΔC is not significant, truncated to the causal rank ('@causal') when its curve ran. p (ΔC): the pooled ΔC's permutation p (the groups' max-T p for ':groups'); the null rank's 95 % CI and stability refer to the pooled ΔC",
            "columns": HEAD_COLUMNS,
            "rows": head_rows(info),
        },
        {
            "caption": "Every swap condition",
            "columns": [
                "head",
                "condition",
                "rank",
                "Δp",
                "Δp 95% CI",
                "Δp random",
                "p vs random",
                "Δp permuted",
                "p vs permuted",
                "flip rate",
                "log-prob shift",
                "shift 95% CI",
            ],
            "rows": _condition_rows(info),
        },
        {
            "caption": "Subspaces per feature and group",
            "columns": [
                "head",
                "feature",
                "group",
                "rank",
                "rank (energy)",
                "n+",
                "n−",
                "p",
                "top singular value",
            ],
            "rows": _subspace_rows(info),
        },
    ]
    proj_rows = [
        [h["name"], f, _f(p["accuracy"]["subspace"]), _pm({"mean": p["accuracy"]["random"], "std": p["accuracy"]["random_std"]}), _f(p["accuracy"]["pca"]), _f(p["accuracy"]["chance"])]
        for h in info["heads"] for f, p in h["projections"].items() if p.get("accuracy")
    ]  # fmt: skip
    if proj_rows:
        tables.append(
            {
                "caption": "Nearest-centroid group accuracy of held-out positive keys in 3-D",
                "columns": ["head", "feature", "subspace", "random", "PCA", "chance"],
                "rows": proj_rows,
            }
        )
    if info.get("scan"):
        tables.append(
            {
                "caption": "Head scan (top 10 by attention difference)",
                "columns": ["head", "diff", "95% CI", "ratio", "top match"],
                "rows": [
                    [
                        r["name"],
                        _f(r["diff"], 4),
                        [_f(x, 4) for x in r["diff_ci"]],
                        _f(r["ratio"], 2),
                        _f(r["top_match"]),
                    ]
                    for r in info["scan"][:10]
                ],
            }
        )
    tables += position_tables(info)
    tables += list(extra_tables)
    return write_section(
        out, key=key, title=run_title(info, title), order=order, summary=summary,
        text=body, tables=tables, figures=[*figs, *extra_figures], heads=blocks,
    )  # fmt: skip
