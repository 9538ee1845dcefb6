"""Verdicts on real contrasts written against the claims they make (issue 24): which test the
verdict used (class: centroid patch; relation: cross-record exchange), the transfer across
position patterns and the guarded causal rank, for each contrast and its coin-flip relabelling.

Contrasts (``--n`` records each, smollm2-135m):

- ``agreement``: subject vs attractor, both word orders (a coin per record);
- ``agreement-position``: the same prompts relabelled by position alone (positive = the noun
  nearer the verb, whatever its role);
- ``same-number``: the same-number control (subject and attractor share the verb's number);
- ``induction``: a list of words in which the query word occurred once before; positive = the
  word that followed it then, negatives = three other words of the list;
- ``two-name``: "When Mary and John went to the store, John gave a drink to" in both name
  orders (positive = the indirect object, negative = the subject's first mention);

each also as ``<name>/coin-flip`` (:func:`qkcov.tasks.records.coin_flip`).

``python benchmarks/verdicts_real.py [--n 80] [--only agreement,induction] [--offsets-only]``
prints first the offset check of every contrast and of the built-in filter and binding tasks
(tokenizer only: positive/negative offset AUC, the share of keys in offset bins holding both
labels, pooled and within the record's group), then one block per run.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

from qkcov.core.position import offset_bins, offset_test
from qkcov.engine.contrast import resolve_records
from qkcov.engine.position import key_offsets
from qkcov.tasks.agreement import AgreementTaskConfig, build_agreement_records
from qkcov.tasks.builtin import build_task_records
from qkcov.tasks.records import ContrastRecord, Span, coin_flip

sys.path.insert(0, str(Path(__file__).parent))
from name_mover import build as build_two_name  # noqa: E402

WORDS = [
    "apple",
    "river",
    "stone",
    "table",
    "garden",
    "window",
    "candle",
    "mirror",
    "forest",
    "bottle",
    "pencil",
    "rabbit",
    "castle",
    "engine",
    "island",
    "ladder",
    "marble",
    "needle",
    "orange",
    "pocket",
    "saddle",
    "tunnel",
    "violin",
    "wagon",
    "anchor",
    "basket",
    "button",
    "carpet",
    "dragon",
    "feather",
    "hammer",
    "jacket",
    "kettle",
    "lemon",
    "magnet",
    "napkin",
    "oyster",
    "parrot",
    "quilt",
    "rocket",
    "silver",
    "teapot",
    "umbrella",
    "velvet",
    "walnut",
    "yellow",
    "zipper",
]
AGREEMENT_HEADS = "L13H8,L25H2"


def induction(n: int, seed: int = 0, length: int = 14) -> list[ContrastRecord]:
    """``w1 … A B … A``: query = the second A; positive = B (the word after A's first
    occurrence); negatives = three other words of the list (not A, not B) drawn from the
    slots B can occupy, so the offsets do not tell B from them."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = rng.sample(WORDS, length)
        a_at = rng.randrange(0, length - 4)
        a, b = words[a_at], words[a_at + 1]
        prompt = " ".join(words) + " " + a
        spans = []
        cursor = 0
        for w in words:
            s = prompt.index(w, cursor)
            spans.append(Span(s, s + len(w), token="first", label=w))
            cursor = s + len(w)
        # negatives from the slots the positive can take (1 .. length − 4): no offset shift
        others = [j for j in range(1, length - 3) if j not in (a_at, a_at + 1)]
        neg = tuple(spans[j] for j in sorted(rng.sample(others, 3)))
        meta = {"task": "induction", "a": a, "b": b, "index": i}
        out.append(ContrastRecord(prompt, (spans[a_at + 1],), neg, meta=meta, kind="relation"))
    return out


def agreement(n: int, numbers: str = "opposite") -> list[ContrastRecord]:
    return build_agreement_records(AgreementTaskConfig(n=n, seed=0, numbers=numbers))


def by_position(records: list[ContrastRecord]) -> list[ContrastRecord]:
    """Positive = the noun nearer the verb (pure position labels)."""
    out = []
    for r in records:
        near = r.meta["keys"]["positives"][0]["word_order"] == "nearer"
        out.append(
            r if near else dataclasses.replace(r, positives=r.negatives, negatives=r.positives)
        )
    return out


def two_name(n: int) -> list[ContrastRecord]:
    return [dataclasses.replace(r, kind="relation") for r in build_two_name(n, seed=0)]


CONTRASTS = {
    "agreement": (lambda n: agreement(n), AGREEMENT_HEADS),
    "agreement-position": (lambda n: by_position(agreement(n)), AGREEMENT_HEADS),
    "same-number": (lambda n: agreement(n, "same"), AGREEMENT_HEADS),
    "induction": (induction, "auto:2"),
    "two-name": (two_name, "auto:2"),
}


def offsets_row(name: str, resolved) -> str:
    pos, neg = key_offsets(resolved)
    t = offset_test(pos, neg)
    offs, lab, grp = [], [], []
    for r in resolved:
        for k in r.keys:
            offs.append(int(r.query) - int(k.pos))
            lab.append(bool(k.positive))
            grp.append(r.record.group or "")
    o, y = torch.tensor(offs), torch.tensor(lab)

    def mixed(strata: list) -> float:
        ids: dict = {}
        sid = torch.tensor([ids.setdefault(s, len(ids)) for s in strata])
        m = sum(
            int((sid == s).sum())
            for s in sid.unique()
            if 0 < int(y[sid == s].sum()) < int((sid == s).sum())
        )
        return m / len(strata)

    bins = offset_bins(o).tolist()
    return (f"{name:28s} keys {len(offs):5d}  median offset +{t['median_pos']:g} / -{t['median_neg']:g}  "
            f"AUC {t['auc']:.2f}{'*' if t['confounded'] else ' '}  mixed {mixed(bins):.2f}  "
            f"mixed within group {mixed(list(zip(bins, grp, strict=True))):.2f}")  # fmt: skip


def _f(x, nd=3):
    return "–" if x is None else f"{x:.{nd}g}" if isinstance(x, float) else str(x)


def report(name: str, res) -> None:
    for h in res.to_dict()["heads"]:
        v = h["verdict"]
        ev = v["evidence"]
        sw = h["swaps"]
        rel = sw.get("relation_test") or {}
        tr = sw.get("transfer") or {}
        cr = sw.get("causal_rank") or {}
        print(f"[{name}] {h['name']}: {v['status']} (test: {ev.get('test')}, kind "
              f"{ev.get('kind_source')}, relation share {_f(ev.get('relation_share'))})")  # fmt: skip
        print(f"    {v['sentence']}")
        print(f"    swap Δp {_f(ev.get('delta_p'))} random {_f(ev.get('random_mean'))} "
              f"(p {_f(ev.get('p_vs_random'))}) permuted {_f(ev.get('permuted_mean'))} full {_f(ev.get('full_key'))}; "
              f"class: effect {_f(ev.get('label_effect'))} vs {_f(ev.get('label_permuted_mean'))} p {_f(ev.get('p_label'))}; "
              f"relation: effect {_f(rel.get('effect'))} (+{_f(rel.get('effect_pos'))}/-{_f(rel.get('effect_neg'))}) "
              f"p {_f(rel.get('p_value'))} floor {_f(rel.get('p_floor'))} pairs {rel.get('n_pairs')} "
              f"Δp(match broken) {_f(rel.get('delta_p'))} same-position partners {_f((rel.get('partners') or {}).get('same_positions'))}")  # fmt: skip
        g = cr.get("guard") or {}
        print(f"    causal rank {cr.get('rank')} (unguarded {g.get('unguarded')}, random share "
              f"{_f(g.get('random_share'))}{', ' + g['reason'] if g.get('reason') else ''})")  # fmt: skip
        if tr.get("available"):
            for row in tr["rows"]:
                print(f"    transfer rank {tr['rank']}: built on {row['built_on']:16s} tested on "
                      f"{row['tested_on']:16s} n {row['n']:3d}  Δp {row['delta_p']:.3f}  "
                      f"(headline {row['headline_delta_p']:.3f}, random {row['random_mean']:.3f})")  # fmt: skip
        else:
            print(f"    transfer: {tr.get('reason')}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=80)
    p.add_argument("--only", default=",".join(CONTRASTS))
    p.add_argument("--offsets-only", action="store_true")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    from qkcov.models.loading import load_model

    lm = load_model("smollm2-135m")
    tok = lm.tokenizer
    names = [x for x in a.only.split(",") if x]
    print("== offsets (tokenizer only)")
    for task in ("filter", "binding"):
        recs = build_task_records(task)
        for feat in sorted({r.feature for r in recs}, key=str):
            rs = [r for r in recs if r.feature == feat]
            print(
                offsets_row(f"{task}{'' if feat is None else ':' + feat}", resolve_records(tok, rs))
            )
    for name, (build, _) in CONTRASTS.items():
        print(offsets_row(name, resolve_records(tok, build(a.n))))
    for order in ("subject-first", "attractor-first"):
        rs = build_agreement_records(AgreementTaskConfig(n=a.n, order=order))
        print(offsets_row(f"agreement {order}", resolve_records(tok, rs)))
    if a.offsets_only:
        return
    from qkcov.pipeline import RunConfig, run

    root = Path(a.out or tempfile.mkdtemp())
    for name in names:
        build, heads = CONTRASTS[name]
        real = build(a.n)
        for label, recs in (("real", real), ("coin-flip", coin_flip(real, seed=1))):
            t0 = time.perf_counter()
            res = run(RunConfig(heads=heads, n_random=50), recs, root / f"{name}-{label}",
                      quiet=True, loaded=(lm.model, lm.tokenizer))  # fmt: skip
            heads = ",".join(h.name for h in res.heads)  # coin flip: the same heads
            print(f"== {name}/{label}: {len(recs)} records, heads {heads}, "
                  f"{time.perf_counter() - t0:.0f} s")  # fmt: skip
            report(f"{name}/{label}", res)
            sys.stdout.flush()


if __name__ == "__main__":
    main()
