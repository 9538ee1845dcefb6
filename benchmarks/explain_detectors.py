"""``qkcov explain`` against attention-pattern detectors computed straight from the model's
eager attention (no qkcov code in the detectors: ``output_attentions=True`` of an
``attn_implementation="eager"`` model).

Detectors, per head:

- ``previous-token``: mean attention to the key one position back (default corpus);
- ``duplicate-token``: mean attention mass on earlier copies of the query's token, over rows
  that have one (default corpus);
- ``induction``: on random token sequences repeated once (length 2 × 25, 24 sequences, ids
  drawn uniformly from the vocabulary), mean attention from each second-half position to the
  token after its first occurrence;
- ``first-token``: mean attention to position 0 (default corpus).

For each detector's top-5 heads, the agreement matrix counts their top hypothesis from
``explain.json`` (by share of what the head selects among the keys after the first, and —
second table — by attention lift: attention on the hypothesis' positive keys ÷ the uniform
share of those keys). The first key is the gate, not a selection hypothesis, so the
first-token detector is compared with the heads' ``sink_share`` (the first key's part of the
logit variance) and ``sink_attention`` (the mean attention on it, measured in qkcov's hook:
a parity check): how many of the detector's top-5 heads are among the top-5 by each.
The targets: of the 5 heads with the highest induction score ≥ 4 get ``induction`` first;
the same for ``previous-token``.

    python benchmarks/explain_detectors.py --from OUT        # OUT: a `qkcov explain` folder
    python benchmarks/explain_detectors.py --docs 360        # runs qkcov.explain itself
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import torch


def detectors(model, tok, texts, n_layers: int, n_heads: int, seed: int = 0) -> dict:
    from qkcov.models.positions import encode

    prev = torch.zeros(n_layers, n_heads, dtype=torch.float64)
    dup = torch.zeros_like(prev)
    first = torch.zeros_like(prev)
    n_rows = n_dup = 0
    with torch.no_grad():
        for text in texts:
            ids = encode(tok, text)[0][:128]
            x = torch.tensor([ids])
            att = model(input_ids=x, output_attentions=True, use_cache=False).attentions
            a = torch.stack([t[0] for t in att]).double()  # [L, H, S, S]
            S = a.shape[-1]
            idx = torch.arange(1, S)
            prev += a[:, :, idx, idx - 1].sum(-1)
            first += a[:, :, 1:, 0].sum(-1)
            n_rows += S - 1
            t = torch.tensor(ids)
            same = (t[:, None] == t[None, :]) & torch.tril(torch.ones(S, S, dtype=torch.bool), -1)
            rows = same.any(1)
            if rows.any():
                dup += (a * same).sum(-1)[:, :, rows].sum(-1)
                n_dup += int(rows.sum())
        g = torch.Generator().manual_seed(seed)
        half = 25
        ind = torch.zeros_like(prev)
        n_ind = 0
        for _ in range(24):
            r = torch.randint(1000, min(tok.vocab_size, 40000), (half,), generator=g)
            x = torch.cat([r, r])[None]
            att = model(input_ids=x, output_attentions=True, use_cache=False).attentions
            a = torch.stack([t[0] for t in att]).double()
            qs = torch.arange(half + 1, 2 * half)
            ind += a[:, :, qs, qs - half + 1].sum(-1)
            n_ind += len(qs)
    return {
        "previous-token": prev / n_rows,
        "duplicate-token": dup / max(n_dup, 1),
        "induction": ind / n_ind,
        "first-token": first / n_rows,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--from", dest="src", type=Path, default=None)
    ap.add_argument("--docs", type=int, default=360)
    ap.add_argument("--detector-docs", type=int, default=96)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--k", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import qkcov
    from qkcov.models.loading import load_model, model_info
    from qkcov.tasks.corpus import default_corpus

    if args.src is not None:
        data = json.loads((args.src / "explain.json").read_text())
    else:
        lm = load_model("smollm2-135m")
        res = qkcov.explain(lm.model, lm.tokenizer, default_corpus(args.docs), progress=False)
        data = res.to_json()
    eager = load_model("smollm2-135m", attn_implementation="eager")
    info = model_info(eager.model)
    det = detectors(eager.model, eager.tokenizer, default_corpus(args.docs)[: args.detector_docs],
                    info.n_layers, info.n_heads)  # fmt: skip
    heads = {(h["layer"], h["head"]): h for h in data["heads"]}

    def by_lift(h: dict) -> str:
        best = max(
            h["hypotheses"], key=lambda x: x["attention"] / max(x["attention_baseline"], 1e-9)
        )
        return best["name"]

    for title, pick in (("top hypothesis by share", lambda h: h["top"]),
                        ("top hypothesis by attention lift", by_lift)):  # fmt: skip
        print(f"\nagreement matrix (rows: each detector's top-{args.k} heads; cells: how many "
              f"have that {title})")  # fmt: skip
        cols = sorted({pick(h) for h in heads.values()})
        print(f"{'detector':<16}" + "".join(f"{c:>15}" for c in cols) + "   heads")
        for name, score in det.items():
            flat = score.flatten()
            top = flat.argsort(descending=True)[: args.k].tolist()
            hs = [(i // info.n_heads, i % info.n_heads) for i in top]
            cnt = Counter(pick(heads[h]) for h in hs if h in heads)
            names = ",".join(f"L{l}H{h}({float(score[l, h]):.2f}):{pick(heads[(l, h)])}"
                             for l, h in hs)  # fmt: skip
            print(f"{name:<16}" + "".join(f"{cnt.get(c, 0):>15}" for c in cols) + f"   {names}")
        for name, hyp in (("induction", "induction"), ("previous-token", "previous-token"),
                          ("duplicate-token", "same-token")):  # fmt: skip
            flat = det[name].flatten()
            top = flat.argsort(descending=True)[: args.k].tolist()
            hit = sum(pick(heads[(i // info.n_heads, i % info.n_heads)]) == hyp for i in top)
            target = "; target >= 4" if name != "duplicate-token" else ""
            print(f"{name}: {hit}/{args.k} of the top-{args.k} {name}-score heads get {hyp} "
                  f"first ({title}){target}")  # fmt: skip
    flat = det["first-token"].flatten()
    top = {
        (i // info.n_heads, i % info.n_heads)
        for i in flat.argsort(descending=True)[: args.k].tolist()
    }
    for key in ("sink_attention", "sink_share"):
        by_sink = sorted(heads, key=lambda h, key=key: heads[h].get(key, 0.0), reverse=True)
        both = top & set(by_sink[: args.k])
        print(f"first-token: {len(both)}/{args.k} of the top-{args.k} first-token-score heads "
              f"are among the top-{args.k} by {key}")  # fmt: skip
    counts = Counter(h["top"] for h in heads.values())
    print("top hypothesis over all heads:", dict(counts.most_common()))


if __name__ == "__main__":
    main()
