"""ΔC of one head on the same records three ways: qkcov's capture (``run_contrast``), a
TransformerLens 4 ``TransformerBridge`` (``run_with_cache`` filtered to ``hook_rot_q`` /
``hook_rot_k``, as its docs suggest) and nnsight (the attention module's
``apply_rotary_pos_emb`` output through ``.source``). Checks that the three ΔC agree
(max |Δ| ≤ 1e-5 of the largest entry) and prints each one's time ÷ qkcov's, measured
interleaved in one process (``--repeats`` rounds, median).

    qkcov tasks export agreement --n 240 --out a240.jsonl
    python benchmarks/peers.py --data a240.jsonl [--head L13H8] [--batch-size 16]

The peers get what a notebook user would write: the records' token ids and positions from
qkcov (``resolve_records``: the same tokens for everyone), batches right-padded (causal
attention: the pads never reach a real position, so no mask or position ids are needed), q at
the query token, the mean positive / negative key per record, ΔC = mean q k̄⁺ᵀ − mean q k̄⁻ᵀ in
float64. TransformerLens is timed twice: the whole forward (its docs' ``run_with_cache``)
and with ``stop_at_layer`` after the head's layer (qkcov's capture stops there too).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from qkcov.core.covariance import ContrastiveCovariance
from qkcov.engine.contrast import resolve_records, run_contrast
from qkcov.models.heads import parse_heads
from qkcov.models.loading import load_model
from qkcov.tasks.records import load_records


def _batches(resolved, batch_size: int):
    for i in range(0, len(resolved), batch_size):
        yield resolved[i : i + batch_size]


def _right_padded(batch, pad_id: int) -> torch.Tensor:
    width = max(len(r.input_ids) for r in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    for b, r in enumerate(batch):
        ids[b, : len(r.input_ids)] = torch.tensor(r.input_ids)
    return ids


def _accumulate(acc: ContrastiveCovariance, batch, q: torch.Tensor, k: torch.Tensor) -> None:
    """``q [B, S, D]`` of the head, ``k [B, S, D]`` of its kv head: each record's query row
    and mean positive / negative key, into the float64 accumulator."""
    for b, r in enumerate(batch):
        qv = q[b, r.query].double()[None]
        pos, neg = r.positives, r.negatives
        kp = k[b, pos].double().mean(0, keepdim=True) if pos else None
        kn = k[b, neg].double().mean(0, keepdim=True) if neg else None
        if kp is not None:
            acc.update(qv, kp, None)
        if kn is not None:
            acc.update(qv, None, kn)


def qkcov_delta(model, tok, resolved, head, batch_size):
    res = run_contrast(model, tok, resolved, [head], batch_size=batch_size, progress=False)
    return res.delta(head)


def tl_delta(bridge, resolved, head, batch_size, pad_id, D, stop: bool):
    layer, h = head
    kv = h // (bridge.cfg.n_heads // bridge.cfg.n_key_value_heads)
    names = [f"blocks.{layer}.attn.hook_rot_q", f"blocks.{layer}.attn.hook_rot_k"]
    acc = ContrastiveCovariance(D)
    for batch in _batches(resolved, batch_size):
        ids = _right_padded(batch, pad_id)
        kw = {"stop_at_layer": layer + 1} if stop else {}
        _, cache = bridge.run_with_cache(ids, names_filter=names, **kw)
        q, k = cache[names[0]], cache[names[1]]  # [B, S, heads, D]
        _accumulate(acc, batch, q[:, :, h], k[:, :, kv])
    return acc.delta()


def nnsight_delta(nm, model, resolved, head, batch_size, pad_id, D):
    from qkcov.models.capture import attention_modules

    layer, h = head
    cfg = model.config
    kv = h // (cfg.num_attention_heads // cfg.num_key_value_heads)
    module = attention_modules(model)[layer]
    path = next(n for n, m in model.named_modules() if m is module)
    acc = ContrastiveCovariance(D)
    for batch in _batches(resolved, batch_size):
        ids = _right_padded(batch, pad_id)
        with nm.trace(ids):
            env = nm
            for part in path.split("."):
                env = env[int(part)] if part.isdigit() else getattr(env, part)
            qk = env.source.apply_rotary_pos_emb_0.output.save()
        q, k = qk[0], qk[1]  # [B, heads, S, D]
        _accumulate(acc, batch, q[:, h], k[:, kv])
    return acc.delta()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    ap.add_argument("--data", required=True)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--head", default="L13H8")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import copy

    from nnsight import NNsight
    from transformer_lens.model_bridge import TransformerBridge

    torch.manual_seed(0)
    lm = load_model(args.model)  # float32, CPU
    model, tok = lm.model, lm.tokenizer
    head = parse_heads(args.head, lm.info.n_layers, lm.info.n_heads)[0]
    D = lm.info.head_dim
    records = load_records(args.data)
    resolved = resolve_records(tok, records)
    pad_id = tok.pad_token_id
    # each library gets its own copy (the bridge switches its model to eager attention)
    bridge = TransformerBridge.boot_transformers(
        args.model, hf_model=copy.deepcopy(model), tokenizer=tok
    )
    nn_model = copy.deepcopy(model)
    nn_model.set_attn_implementation("eager")
    nm = NNsight(nn_model)

    def runs(recs):
        return {
            "qkcov": lambda: qkcov_delta(model, tok, recs, head, args.batch_size),
            "transformer-lens (whole forward)": lambda: tl_delta(
                bridge, recs, head, args.batch_size, pad_id, D, stop=False
            ),
            "transformer-lens (stop_at_layer)": lambda: tl_delta(
                bridge, recs, head, args.batch_size, pad_id, D, stop=True
            ),
            "nnsight": lambda: nnsight_delta(nm, nn_model, recs, head, args.batch_size, pad_id, D),
        }

    names = list(runs(resolved))
    times: dict[str, list[float]] = {k: [] for k in names}
    deltas: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for fn in runs(resolved[: args.batch_size]).values():  # warm-up on one batch
            fn()
        for _ in range(args.repeats):  # interleaved rounds over every record
            for name, fn in runs(resolved).items():
                t0 = time.perf_counter()
                deltas[name] = fn()
                times[name].append(time.perf_counter() - t0)
    ref = deltas["qkcov"]
    scale = float(ref.abs().max())
    print(
        f"{args.model} {args.head}, {len(resolved)} records, batch {args.batch_size}, "
        f"{args.repeats} interleaved rounds (median seconds), {torch.get_num_threads()} threads"
    )
    base = statistics.median(times["qkcov"])
    ok = True
    for name in names:
        rel = float((deltas[name] - ref).abs().max()) / scale
        ok &= rel <= 1e-5
        t = statistics.median(times[name])
        print(
            f"  {name:34s} {t:7.2f} s   x{t / base:5.2f} of qkcov   max|ΔC − ΔC_qkcov| / max|ΔC| = {rel:.1e}"
        )
    print("ΔC agree within 1e-5: " + ("yes" if ok else "NO"))
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
