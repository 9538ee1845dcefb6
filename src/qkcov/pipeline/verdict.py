"""One verdict per head (see :class:`qkcov.results.Verdict`)."""

from __future__ import annotations

from typing import Any

from ..core.conditional import (
    MIN_LABEL_EFFECT,
    MIN_RELATION_PAIRS,
    MIN_SWAP_EFFECT,
    decide,
    p_floor,
)
from ..results import HeadResult, SwapResult, Verdict, format_p, headline_p
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
    label-permuted subspaces and the label-sensitive test that fits the feature — the
    centroid patch for a class feature (its label nulls conditioned on ``--control``), the
    cross-record exchange with position-matched partners for a relational one (see
    :func:`_label_kind`) — plus the guarded causal rank and the transfer across position
    patterns where they ran (see :class:`Verdict`; the decision order and the effect floors
    are :func:`qkcov.core.conditional.decide`)."""
    a = cfg.alpha
    d = h.to_dict()
    sig = d["significance"] or {}
    sw = h.swaps
    c = sw.conditions.get(sw.headline or "")
    kind, source, share = _label_kind(sw)
    rel = sw.relation_test or {}
    lab = sw.label_test or {}
    cond = lab.get("conditioning") or {}
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
        "conditioned_on": list(cond.get("conditioned_on") or []),
        "mixed_fraction": cond.get("mixed_fraction"),
        "mixed_by_control": cond.get("by_control"),
        "confounded": bool(cond.get("confounded")),
        "fixed_by": list(cond.get("fixed_by") or []),
        "conditioning_note": cond.get("note") or "",
        "min_swap_effect": MIN_SWAP_EFFECT,
        "min_label_effect": MIN_LABEL_EFFECT,
        "p_floors": {
            "p_null": p_floor(cfg.n_permutations) if cfg.n_permutations else None,
            "p_vs_random": p_floor(sw.n_random) if sw.n_random else None,
            "p_vs_permuted": p_floor(sw.n_permuted) if sw.n_permuted else None,
            "p_label": lab.get("p_floor"),
            "p_relation": rel.get("p_floor"),
        },
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
    fl = ev["p_floors"]

    def f(x: Any) -> str:
        return "–" if x is None else f"{x:.3g}"

    def fp(key: str) -> str:  # "= 0.023", or "≤ 0.01" at the draws' floor
        text = format_p(ev.get(key), fl.get(key))
        return f"≤ {text[1:]}" if text.startswith("≤") else f"= {text}"

    on = ev["conditioned_on"]
    given = (
        f"labels permuted within {' × '.join(on)} strata, mixed fraction "
        f"{f(ev['mixed_fraction'])}" if on else (ev["conditioning_note"] or "unconditioned")
    )  # fmt: skip
    no_subspace = sig.get("available") and not (p_null is not None and p_null < a)
    if c is None:
        if no_subspace or (sig.get("available") and not sig.get("significant")):
            return Verdict("no-evidence", f"{name}: no key subspace above the permutation null "
                           f"(p (null) {fp('p_null')}, α = {a:g}); nothing to swap.", ev)  # fmt: skip
        return Verdict("not-testable", f"{name}: not testable — {sw.skipped or 'no swap ran'}.", ev)
    if not sig.get("available"):
        return Verdict("not-testable", f"{name}: not testable — {sig.get('reason') or 'no significance test'} "
                       f"(the rank-{c.rank} swap gives Δp {f(ev['delta_p'])} vs {f(ev['random_mean'])} random).", ev)  # fmt: skip
    swap = (f"its rank-{c.rank} key subspace swap moves Δp {f(ev['delta_p'])} vs "
            f"{f(ev['random_mean'])} for random (p {fp('p_vs_random')})"
            + ("" if c.p_permuted is None else
               f" and {f(ev['permuted_mean'])} for label-permuted subspaces (p {fp('p_vs_permuted')})"))  # fmt: skip
    extra = _transfer_clause(sw) + (
        f"; causal rank: {guard['reason']}" if guard.get("reason") else ""
    )
    which = (f"{'declared' if source == 'declared' else 'detected'} {kind} feature, "
             + ("" if share is None else f"relational share {share:.2f}, ") + f"tested by the {ev['test']}")  # fmt: skip
    decision = dict(ev)
    if kind == "class":
        test = lab
        patch = (
            f"moving keys to the other class's centroid inside it shifts Δp by {f(lab.get('effect'))} "
            f"vs {f((lab.get('permuted') or {}).get('mean'))} with permuted labels (p {fp('p_label')})"
        )
    else:  # the exchange's partners are matched in position: it is its own position control
        test = rel
        decision.update(
            confounded=False,
            label_effect=rel.get("effect") if rel.get("available") else None,
            label_permuted_mean=0.0,  # the exact sign-flip null is centred on 0
            p_label=rel.get("p_value") if rel.get("available") else None,
            label_underpowered=int(rel.get("n_pairs") or 0) < MIN_RELATION_PAIRS,
        )
        patch = (
            f"giving the positive key another record's positive coordinates inside it moves "
            f"attention by {f(rel.get('effect'))} more than the same exchange on the negative keys "
            f"(exact sign-flip p {fp('p_relation')}, {rel.get('n_pairs')} record pairs)"
        )
        given = "partners matched in position"
    status, why = decide(decision, a)
    if why == "no-subspace":
        text = f"{name}: ΔC is not above its null (p (null) {fp('p_null')}): no causal evidence{extra}."
    elif why == "no-swap-effect":
        text = f"{name}: ΔC is above its null (p (null) {fp('p_null')}) but {swap}: no causal evidence{extra}."
    elif why == "swap-below-floor":
        text = (f"{name}: {swap}, less than the effect floor of {MIN_SWAP_EFFECT:g} beyond "
                f"random subspaces: too small to read{extra}.")  # fmt: skip
    elif why == "confounded":
        fixed = ev["fixed_by"]
        what = ("the offset" if fixed == ["offset"] else
                " × ".join("the offset" if x == "offset" else f"the key attribute {x!r}" for x in fixed))  # fmt: skip
        out = ("vary where the positives sit (balance their offsets against the negatives')"
               if fixed == ["offset"] else
               "give positives and negatives every value of " + " and of ".join(
                   "the offset" if x == "offset" else repr(x) for x in fixed))  # fmt: skip
        text = (f"{name}: {swap}, but the labels are a function of {what} in these records "
                f"(mixed fraction {f(ev['mixed_fraction'])}: the share of keys in strata of "
                f"{' × '.join(on)} holding both labels), so nothing beyond {what} can be "
                f"tested: {out}.")  # fmt: skip
    elif why == "no-label-test":
        text = (f"{name}: {swap}, but the label-sensitive test did not run "
                f"({test.get('reason') or 'off'}), so whether the labels live in it is untested{extra}.")  # fmt: skip
    elif why == "label":
        what = "the feature" if kind == "class" else "the query–key relation"
        text = f"{name} reads {what}: {patch}; {swap}{extra}."
    elif why == "label-underpowered":
        text = (f"{name}: {swap}, and {patch}: with {rel.get('n_pairs')} record pairs (fewer than "
                f"{MIN_RELATION_PAIRS}) the relational test cannot rule the relation out — give "
                f"more held-out records{extra}.")  # fmt: skip
    elif why == "separates":
        text = f"{name} separates the keys but not by the feature: {swap}, yet {patch}{extra}."
    elif why == "label-below-floor":
        text = (f"{name}: {swap}, and {patch}, less than the effect floor of "
                f"{MIN_LABEL_EFFECT:g} beyond permuted labels: too small to read{extra}.")  # fmt: skip
    else:
        # neither label-sensitive test passes: a subspace of Σ ±q(k⁺−k⁻)ᵀ with any labels
        # would move attention as far (the swap touches the key difference, whatever the labels)
        text = (f"{name}: {swap}, no further than label-permuted subspaces, and {patch}: the "
                f"swap touches the key difference whatever the labels, so nothing says the "
                f"labels live in it{extra}.")  # fmt: skip
    return Verdict(status, f"{text} [{which}; {given}]", ev)


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
