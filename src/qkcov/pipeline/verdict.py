"""One verdict per head (see :class:`qkcov.results.Verdict`)."""

from __future__ import annotations

from typing import Any

from ..results import HeadResult, SwapResult, Verdict, headline_p
from .config import RunConfig


def _label_kind(sw: SwapResult) -> tuple[str, str, float | None]:
    """Which label-sensitive test the verdict uses: ``(kind, source, relational share)`` —
    the feature's declared ``kind`` when its records give one, else ``"relation"`` when the
    build records' ΔC inside the headline subspace is mostly relational (share above
    :data:`qkcov.engine.relational.RELATION_SHARE`), else ``"class"``."""
    from ..engine.relational import RELATION_SHARE

    rel = sw.relation_test or {}
    share = rel.get("relation_share")
    if rel.get("declared_kind"):
        return str(rel["declared_kind"]), "declared", share
    return (
        ("relation" if share is not None and share > RELATION_SHARE else "class"),
        "detected",
        share,
    )


def _verdict(h: HeadResult, cfg: RunConfig) -> Verdict:
    """One verdict per head from the significance test, the swap against random and
    label-permuted subspaces and the label-sensitive test that fits the feature: the centroid
    patch for a class feature, the cross-record exchange for a relational one (see
    :class:`Verdict` and :func:`_label_kind`); plus the guarded causal rank and the transfer
    across position patterns where they ran."""
    a = cfg.alpha
    d = h.to_dict()
    sig = d["significance"] or {}
    sw = h.swaps
    c = sw.conditions.get(sw.headline or "")
    kind, source, share = _label_kind(sw)
    rel = sw.relation_test or {}
    lab = (sw.label_test or {}) if kind == "class" else rel
    p_null = headline_p(d) if sig.get("available") else None
    guard = (sw.causal_rank or {}).get("guard") or {}
    ev: dict[str, Any] = {
        "p_null": p_null,
        "rank_null": sig.get("rank_null"),
        "rank_energy": h.headline.rank_energy,
        "rank_ci": sig.get("rank_ci"),
        "causal_rank": (sw.causal_rank or {}).get("rank"),
        "condition": sw.headline,
        "alpha": a,
        "test": "centroid patch" if kind == "class" else "cross-record exchange",
        "kind": kind,
        "kind_source": source,
        "relation_share": share,
        "rank_guard": guard.get("reason"),
    }
    if c is not None:
        ev.update(
            rank=c.rank, delta_p=c.metrics.get("delta_p"), delta_p_ci=(c.ci or {}).get("delta_p"),
            random_mean=(c.random or {}).get("delta_p", {}).get("mean"), p_vs_random=c.p_value,
            permuted_mean=(c.permuted or {}).get("delta_p", {}).get("mean"),
            p_vs_permuted=c.p_permuted,
            full_key=None if sw.ceiling is None else sw.ceiling.metrics.get("delta_p"),
        )  # fmt: skip
    if (sw.label_test or {}).get("available"):
        cl = sw.label_test
        ev.update(label_effect=cl["effect"], label_ci=cl["ci"],
                  label_permuted_mean=cl["permuted"]["mean"], p_label=cl["p_value"])  # fmt: skip
    if rel.get("available"):
        ev.update(relation_effect=rel["effect"], relation_ci=rel["ci"], p_relation=rel["p_value"],
                  p_relation_floor=rel["p_floor"])  # fmt: skip
    name = h.name

    def f(x: Any) -> str:
        return "–" if x is None else f"{x:.3g}"

    no_subspace = sig.get("available") and not (p_null is not None and p_null < a)
    if c is None:
        if no_subspace or (sig.get("available") and not sig.get("significant")):
            return Verdict("no-evidence", f"{name}: no key subspace above the permutation null "
                           f"(p (null) = {f(p_null)}, α = {a:g}); nothing to swap.", ev)  # fmt: skip
        return Verdict("not-testable", f"{name}: not testable — {sw.skipped or 'no swap ran'}.", ev)
    if not sig.get("available"):
        return Verdict("not-testable", f"{name}: not testable — {sig.get('reason') or 'no significance test'} "
                       f"(the rank-{c.rank} swap gives Δp {f(ev['delta_p'])} vs {f(ev['random_mean'])} random).", ev)  # fmt: skip
    swap = (f"its rank-{c.rank} key subspace swap moves Δp {f(ev['delta_p'])} vs "
            f"{f(ev['random_mean'])} for random (p = {f(c.p_value)})"
            + ("" if c.p_permuted is None else
               f" and {f(ev['permuted_mean'])} for label-permuted subspaces (p = {f(c.p_permuted)})"))  # fmt: skip
    extra = _transfer_clause(sw) + (
        f"; causal rank: {guard['reason']}" if guard.get("reason") else ""
    )
    which = (f" [{'declared' if source == 'declared' else 'detected'} {kind} feature"
             + ("" if share is None else f", relational share {share:.2f}") + "]")  # fmt: skip
    if no_subspace or c.p_value is None or c.p_value >= a:
        return Verdict("no-evidence", f"{name}: ΔC is above its null (p (null) = {f(p_null)}) "
                       f"but {swap}: no causal evidence{extra}.", ev)  # fmt: skip
    if not lab.get("available"):
        return Verdict("not-testable", f"{name}: {swap}, but the label-sensitive test did not run "
                       f"({lab.get('reason') or 'off'}), so whether the labels live in it is untested{which}.", ev)  # fmt: skip
    if kind == "class":
        patch = (
            f"moving keys to the other class's centroid inside it shifts Δp by {f(lab['effect'])} "
            f"vs {f(lab['permuted']['mean'])} with permuted labels (p = {f(lab['p_value'])})"
        )
        label_ok = lab["p_value"] < a and lab["effect"] > 0
    else:
        patch = (
            f"giving the positive key another record's positive coordinates inside it moves "
            f"attention by {f(lab['effect'])} more than the same exchange on the negative keys "
            f"(exact sign-flip p = {f(lab['p_value'])}, floor {f(lab['p_floor'])}, "
            f"{lab['n_pairs']} record pairs)"
        )
        label_ok = lab["p_value"] < a and lab["effect"] > 0
    if label_ok:
        what = "the feature" if kind == "class" else "the query–key relation"
        return Verdict("reads-feature", f"{name} reads {what}: {patch}; {swap}{extra}{which}.", ev)
    if c.p_permuted is not None and c.p_permuted < a:
        return Verdict("separates-keys-not-feature", f"{name} separates the keys but not by the "
                       f"feature: {swap}, yet {patch}{extra}{which}.", ev)  # fmt: skip
    # neither label-sensitive test passes: a subspace of Σ ±q(k⁺−k⁻)ᵀ with any labels would
    # move attention as far (the swap touches the key difference, whatever the labels)
    return Verdict("no-evidence", f"{name}: {swap}, no further than label-permuted subspaces, "
                   f"and {patch}: the swap touches the key difference whatever the labels, so "
                   f"nothing says the labels live in it{extra}{which}.", ev)  # fmt: skip


def _transfer_clause(sw: SwapResult) -> str:
    """``"; built on <one pattern> …"``: the transfer's smallest cross-pattern Δp beside its
    in-distribution Δp, or ``""`` when no transfer ran."""
    tr = sw.transfer or {}
    if not tr.get("available"):
        return ""
    rows = tr["rows"]
    cross = [r for r in rows if not r["in_distribution"]]
    worst = min(cross, key=lambda r: r["delta_p"])
    same = next(
        (r for r in rows if r["in_distribution"] and r["tested_on"] == worst["tested_on"]), None
    )
    return (f"; built on the records with the positive {worst['built_on'].split('-')[1]} and "
            f"swapped on those with it {worst['tested_on'].split('-')[1]}, a rank-{tr['rank']} "
            f"subspace moves Δp {worst['delta_p']:.3g}"
            + ("" if same is None else f" (built on those: {same['delta_p']:.3g})")
            + f", random {worst['random_mean']:.3g}")  # fmt: skip
