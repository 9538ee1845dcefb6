"""One verdict per head (see :class:`qkcov.results.Verdict`)."""

from __future__ import annotations

from typing import Any

from ..results import HeadResult, Verdict, headline_p
from .config import RunConfig


def _verdict(h: HeadResult, cfg: RunConfig) -> Verdict:
    """One verdict per head from the significance test, the swap against random and
    label-permuted subspaces and the label-sensitive centroid patch (see :class:`Verdict`)."""
    a = cfg.alpha
    d = h.to_dict()
    sig = d["significance"] or {}
    sw = h.swaps
    c = sw.conditions.get(sw.headline or "")
    lab = sw.label_test or {}
    p_null = headline_p(d) if sig.get("available") else None
    ev: dict[str, Any] = {
        "p_null": p_null,
        "rank_null": sig.get("rank_null"),
        "rank_energy": h.headline.rank_energy,
        "rank_ci": sig.get("rank_ci"),
        "causal_rank": (sw.causal_rank or {}).get("rank"),
        "condition": sw.headline,
        "alpha": a,
    }
    if c is not None:
        ev.update(
            rank=c.rank, delta_p=c.metrics.get("delta_p"), delta_p_ci=(c.ci or {}).get("delta_p"),
            random_mean=(c.random or {}).get("delta_p", {}).get("mean"), p_vs_random=c.p_value,
            permuted_mean=(c.permuted or {}).get("delta_p", {}).get("mean"),
            p_vs_permuted=c.p_permuted,
            full_key=None if sw.ceiling is None else sw.ceiling.metrics.get("delta_p"),
        )  # fmt: skip
    if lab.get("available"):
        ev.update(label_effect=lab["effect"], label_ci=lab["ci"],
                  label_permuted_mean=lab["permuted"]["mean"], p_label=lab["p_value"])  # fmt: skip
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
    if no_subspace or c.p_value is None or c.p_value >= a:
        return Verdict("no-evidence", f"{name}: ΔC is above its null (p (null) = {f(p_null)}) "
                       f"but {swap}: no causal evidence.", ev)  # fmt: skip
    if not lab.get("available"):
        return Verdict("not-testable", f"{name}: {swap}, but the label-sensitive test did not run "
                       f"({lab.get('reason') or 'off'}), so whether the labels live in it is untested.", ev)  # fmt: skip
    patch = (
        f"moving keys to the other class's centroid inside it shifts Δp by {f(lab['effect'])} "
        f"vs {f(lab['permuted']['mean'])} with permuted labels (p = {f(lab['p_value'])})"
    )
    if lab["p_value"] < a and lab["effect"] > 0:
        return Verdict("reads-feature", f"{name} reads the feature: {patch}; {swap}.", ev)
    if c.p_permuted is not None and c.p_permuted < a:
        return Verdict("separates-keys-not-feature", f"{name} separates the keys but not by the "
                       f"feature: {swap}, yet {patch}.", ev)  # fmt: skip
    # neither label-sensitive test passes: a subspace of Σ ±q(k⁺−k⁻)ᵀ with any labels would
    # move attention as far (the swap touches the key difference, whatever the labels)
    return Verdict("no-evidence", f"{name}: {swap}, no further than label-permuted subspaces, "
                   f"and {patch}: the swap touches the key difference whatever the labels, so "
                   "nothing says the labels live in it.", ev)  # fmt: skip
