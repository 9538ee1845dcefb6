"""Memory of ``qkcov explain`` at 8B width: the formula for Llama-3.1-8B, measured on a slice.

1. An 8B-shaped Llama config (32 layers, 32 heads, 8 KV heads, head_dim 128, hidden 4096,
   MLP 14336, vocabulary 128256) is built on the ``meta`` device — no weight is allocated —
   and :func:`qkcov.core.explain.memory_bytes` gives the running sums of ``--heads all`` with
   the default hypotheses: ``heads × ((hypotheses + 1) × D² + hypotheses²) × 8`` bytes, held
   in host memory by every rank under torchrun. Printed beside the weights (P × 2 bytes in
   bfloat16) and the per-batch, per-layer transient of the update (the terms of
   :mod:`qkcov.core.explain`'s docstring) at the batch size and sequence length given.
2. A model of ``--layers`` layers of exactly that width (random weights, ``--dtype``) runs
   :func:`qkcov.engine.explain.explain_heads` over a small default corpus on the CPU, every
   head; the peak RSS rise during that call (``VmHWM`` after resetting it through
   ``/proc/self/clear_refs`` where the kernel allows, else ``VmRSS`` sampled every 5 ms) is
   printed against the formula of its own sums and against sums + transient; then, on the
   longest batch alone, one layer's update and the model's own forward (no hooks), which
   together with the allocator's retained blocks make the rest of the rise.

    python benchmarks/explain_memory.py [--layers 4] [--docs 16] [--max-len 128]
                                        [--batch-size 8] [--dtype float32] [--threads 2]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import threading
import time
from pathlib import Path

import torch

from explain_speed import _vm  # same folder: python benchmarks/explain_memory.py

EIGHT_B = {
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
}


def _reset_peak() -> bool:
    """Reset ``VmHWM`` to the current RSS (``clear_refs`` 5); False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _vm("VmHWM") <= _vm("VmRSS") + (1 << 20)


def _transient(B: int, H: int, N: int, S: int, D: int) -> int:
    """Per batch and layer: logits, weights and centred logits (``B·H·S²·4·5``), weighted
    indicators (``B·H·N·S²·4``), pair masks and weights (``B·N·S²·5``), weighted keys
    (``B·N·H·S·D·4``), as stated in :mod:`qkcov.core.explain`."""
    return B * H * S * S * 4 * 5 + B * H * N * S * S * 4 + B * N * S * S * 5 + B * N * H * S * D * 4


def _config(layers: int):
    from transformers import LlamaConfig

    cfg = LlamaConfig(**{**EIGHT_B, "num_hidden_layers": layers})
    cfg._attn_implementation = "sdpa"
    return cfg


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--docs", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import LlamaForCausalLM

    from qkcov.core.explain import memory_bytes
    from qkcov.engine.explain import explain_heads, plan_corpus, tokenize_corpus
    from qkcov.explainer import ExplainConfig
    from qkcov.models.capture import padded_forward
    from qkcov.models.loading import model_info
    from qkcov.models.tiny import tiny_tokenizer
    from qkcov.tasks.corpus import default_corpus
    from qkcov.tasks.hypotheses import resolve_hypotheses

    hyps = resolve_hypotheses(ExplainConfig().hypothesis_names())
    N = len(hyps)
    B, S = args.batch_size, args.max_len

    # 1. the 8B shape, formula only: the weights live on the meta device (nothing allocated)
    with torch.device("meta"):
        big = LlamaForCausalLM(_config(EIGHT_B["num_hidden_layers"]))
    info = model_info(big)
    n_params = sum(p.numel() for p in big.parameters())
    heads = info.n_layers * info.n_heads
    sums = memory_bytes(heads, N, info.head_dim)
    per_layer = _transient(B, info.n_heads, N, S, info.head_dim)
    print(
        f"8B-shaped Llama ({info.n_layers} layers x {info.n_heads} heads, {info.n_kv_heads} KV "
        f"heads, head_dim {info.head_dim}, hidden {EIGHT_B['hidden_size']}; {n_params / 1e9:.2f} "
        f"B parameters = {n_params * 2 / 2**30:.1f} GiB in bfloat16, not allocated)"
    )
    print(
        f"  --heads all, {N} hypotheses: sums = {heads} x (({N} + 1) x {info.head_dim}^2 + {N}^2) "
        f"x 8 B = {sums / 2**30:.2f} GiB float64 (host memory, every rank holds all of them; "
        f"reduced layer by layer: {sums / info.n_layers / 2**20:.0f} MiB buffer per collective)"
    )
    print(
        f"  per batch and layer (B={B}, S={S}): {per_layer / 2**20:.0f} MiB transient on the "
        "model's device, freed before the next layer"
    )
    del big

    # 2. a slice of that width, random weights, measured
    cfg = _config(args.layers)
    tok = tiny_tokenizer()
    cfg.vocab_size = 128  # the char tokenizer's ids; the embedding is not what is measured
    cfg.tie_word_embeddings = True
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = LlamaForCausalLM(cfg).to(getattr(torch, args.dtype)).eval()
    small = model_info(model)
    plan = plan_corpus(tokenize_corpus(tok, default_corpus(args.docs), S), hyps)
    all_heads = [(l, h) for l in range(small.n_layers) for h in range(small.n_heads)]
    print(
        f"slice: {small.n_layers} layers of that width ({len(all_heads)} heads, "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.0f} M parameters, {args.dtype}, "
        f"built in {time.perf_counter() - t0:.0f} s); corpus {len(plan.seqs)} sequences, "
        f"{plan.n_tokens} tokens, batch {B}, up to {S} tokens"
    )

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # hand freed heap back to the OS
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    base = _vm("VmRSS")
    hwm = _reset_peak()
    peak = [base]
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(0.005):
            peak[0] = max(peak[0], _vm("VmRSS"))

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    t = time.perf_counter()
    explain_heads(model, plan, all_heads, batch_size=B, progress=False)
    dt = time.perf_counter() - t
    stop.set()
    th.join()
    rise = (_vm("VmHWM") if hwm else peak[0]) - base
    formula = memory_bytes(len(all_heads), N, small.head_dim)
    longest = max(len(s) for s in plan.seqs)
    transient = _transient(B, small.n_heads, N, longest, small.head_dim)
    how = "VmHWM reset by clear_refs" if hwm else "VmRSS sampled every 5 ms"
    print(
        f"  explain_heads {dt:.0f} s; peak RSS rise {rise / 2**20:.0f} MiB ({how}); "
        f"formula: sums {formula / 2**20:.0f} MiB, + one layer's transient at S={longest} "
        f"{transient / 2**20:.0f} MiB = {(formula + transient) / 2**20:.0f} MiB; "
        f"rise / sums = {rise / formula:.2f}, rise / (sums + transient) = "
        f"{rise / (formula + transient):.2f}"
    )
    # what the transient is: one layer's update on the longest batch, alone (random q/k of
    # the model's shape; the second call, once the allocator holds the first call's blocks)
    from qkcov.core.explain import LayerSums

    idx = sorted(range(len(plan.seqs)), key=lambda i: len(plan.seqs[i]))[-B:]
    bt = plan.batch(idx)
    shape = (len(idx), small.n_heads, bt["input_ids"].shape[1], small.head_dim)
    q, k = torch.randn(shape), torch.randn(shape)
    acc = LayerSums(list(range(small.n_heads)), N, small.head_dim)
    for _ in range(2):
        gc.collect()
        base = _vm("VmRSS")
        _reset_peak()
        acc.update(q, k, bt["pos"], bt["weights"], bt["allowed"], small.head_dim**-0.5)
        one = _vm("VmHWM") - base
    # and the model's own forward on that batch, without hooks (its activations)
    del q, k, acc
    for _ in range(2):
        gc.collect()
        base = _vm("VmRSS")
        _reset_peak()
        with torch.inference_mode():
            padded_forward(model, bt["input_ids"], bt["attention_mask"], logits_to_keep=1)
        fwd = _vm("VmHWM") - base
    print(
        f"  on the longest batch (B={shape[0]}, S={shape[2]}), alone: one layer's update peak "
        f"rise {one / 2**20:.0f} MiB (transient formula {transient / 2**20:.0f} MiB); the "
        f"model's forward without hooks {fwd / 2**20:.0f} MiB"
        + ("" if hwm else " (VmHWM could not be reset: not measured)")
    )


if __name__ == "__main__":
    main()
