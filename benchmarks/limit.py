"""Each phase of a real `qkcov run` against its physical limit, measured in the same process.

The limit of a phase is a *lean forward* of the records it must touch: ``model(input_ids,
attention_mask)`` with position ids from the mask, no cache and only the last position's
logits, under ``torch.inference_mode``, in batches of the run's ``--batch-size`` padded on the
left exactly like :func:`qkcov.models.capture.tokenize_batch` (the texts are the run's own
formatted prompts, :func:`qkcov.engine.contrast.resolve_records`). The records of each role
come from the pipeline's own split and subsets (:func:`qkcov.pipeline.plan_records`,
``pipeline._subset``):

- ``build``: every build record — one forward feeds the head scan subset and every feature's
  ΔC (phases ``scan``, ``contrast``);
- ``heldout``: every held-out record — one forward feeds the projections, the attribution's
  full keys and the swaps' base state: the swap records' forward *is* the swaps' unedited
  base, captured in the ``collect`` phase (phases ``collect``, ``projections``);
- ``swaps``: per head the downstream suffix: (conditions measured downstream — read from the
  saved ``run.json``: every swap condition, the ceiling and every random draw that has a
  ``logprob_shift``) × swap prompts (``--n-swap``) × (layers from the edited one to the last
  ÷ all layers; the edited layer is counted: its attention output changes) × the lean
  forward's cost per swap record (phases ``swaps``, ``token_view``).

Any other phase (``resolve``, ``subspaces``, ``attribution``, ``position``, …) does no forward:
its seconds and share of the run are printed instead. Phase names are read from
``result.timings``; a name this table does not know is counted as "no forward" and flagged
``(unknown phase)``. Each phase line is ``seconds ÷ its role's limit``; the ``[role]`` lines
sum the phases sharing a role. ``run_over_limit=`` is the wall time of ``pipeline.run`` (artifacts
and report included) ÷ (lean build + lean held-out + every head's suffix): one lean pass per
record per role and the downstream suffixes — the sum of the role limits, the swaps' base
being part of the held-out pass.

Timing is interleaved: lean forwards, run, lean forwards, run, …; each run is compared with the
mean of the lean forwards just before and just after it. Peak memory per phase: on CPU the
peak RSS (``VmHWM``, reset at each phase start through ``/proc/self/clear_refs``) above the RSS
at the phase start; on CUDA ``torch.cuda.max_memory_allocated`` above the allocation at the
phase start; both beside the formula of ``docs/research-scale.md`` ("Memory per phase").

    python benchmarks/limit.py [--quick] [--records 240,960] [--heads 1,3,8] [--repeats 1]
                               [--device cpu|cuda] [--dtype auto] [--batch-size 8]

``--quick``: 240 records × 3 heads only. The functions are importable
(``benchmarks/gpu_check.py`` reuses them on an 8B-shaped model).

Measured 2026-12-01 with ``OMP_NUM_THREADS=1 python benchmarks/limit.py --quick`` (SmolLM2-135M,
float32, CPU; 2 cores shared with other jobs, load ≈ 4.5, so seconds are ≈ 2.5 × an idle
machine's and noisy; the ratios compare timings of one process): 240 records × 3 heads, run
159.6 s against a limit of 79.6 s (lean build 10.2 + held-out 4.4 + swap suffix 65.1 s:
13 / 14 / 14 conditions × 64 prompts) → ``run_over_limit=2.00``; build phases (scan 1.01 +
contrast 0.93) 1.94 × the build limit, held-out phases (collect 3.12) 3.16 ×, swaps 1.62 ×
(66 % of the run). Peak RSS above the phase start: swaps 107 MiB (formula 12 MiB), subspaces
75 MiB (formula 6 MiB), scan 14 MiB (formula 2.8 MiB), the others ≤ 3.4 MiB.
The full matrix right after (``python benchmarks/limit.py``, the load falling from ≈ 5 to ≈ 1.6
midway, so the lean forwards before and after a run can differ and ratios moved by up to ±0.5
between repeats of one configuration): run_over_limit 1.61 / 1.36 / 1.43 at 240 records × 1 / 3 /
8 heads, 0.88 / 1.24 / 1.22 at 960 records (a ratio below 1 is load drift, not a run faster
than its limit); wall times across configurations are not comparable on such a machine.
Measured 2026-12-06 after ``--heads auto`` became one forward over the build records (no scan
forward; ``OMP_NUM_THREADS=1 python benchmarks/limit.py --quick --repeats 3``, load falling
from ≈ 3 to ≈ 0.2): ``run_over_limit=1.17`` (runs 1.20, 1.17, 1.13), build phases (scan 0.95,
contrast 0.00: it folds the captured q/k) 0.95 × the build limit; the two-pass run against the
one-pass run interleaved in one process (load ≈ 1): 1.23 / 1.23 vs 1.18 / 1.14.
Measured 2026-12-06 after the held-out records are forwarded once (the swap records' forward is
the swaps' base; the collection reads their vectors from it), the sequential test's tops from
the Gram matrix, the attribution's bases orthogonalised once (``OMP_NUM_THREADS=1 python
benchmarks/limit.py --quick --repeats 3``, idle machine, load ≈ 0.9): ``run_over_limit=1.08``
(runs 1.08, 1.08, 1.09; 58.0 s vs 53.8 s): build phases 0.92 ×, held-out phases 0.99 × (the
base included), swaps 0.99 × the suffix; no-forward phases: subspaces 2.52 s, artifacts and
report 2.18 s, attribution 0.32 s.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

# role of each known phase (phases doing a forward); everything else does none
PHASE_ROLE = {
    "scan": "build",
    "contrast": "build",
    "build": "build",
    "collect": "heldout",
    "heldout": "heldout",
    "projections": "heldout",
    "swaps": "swaps",
    "token_view": "swaps",
}
NO_FORWARD = {"resolve", "subspaces", "statistics", "attribution", "position", "load", "extras"}
OUTSIDE = "(outside phases)"  # run() wall time not inside any timed phase: artifacts, report
MIB = 2**20


# --------------------------------------------------------------------------- records
def role_indices(plan: Any, cfg: Any) -> dict[str, list[int]]:
    """Record indices of each role, from the pipeline's own split and subsets."""
    from qkcov.pipeline import record_subsets

    return record_subsets(plan, cfg)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def lean_forward(model: Any, tokenizer: Any, texts: Sequence[str], batch_size: int) -> float:
    """Seconds of one lean forward over ``texts`` (left padded, ``batch_size`` per batch)."""
    from qkcov.models.capture import position_ids_from_mask, tokenize_batch
    from qkcov.models.loading import input_device

    if not texts:
        return 0.0
    device = input_device(model)
    batches = [tokenize_batch(tokenizer, list(texts[s : s + batch_size]), "left")
               for s in range(0, len(texts), batch_size)]  # fmt: skip
    _sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for ids, mask in batches:
            ids, mask = ids.to(device), mask.to(device)
            model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                  use_cache=False, logits_to_keep=1)  # fmt: skip
    _sync(device)
    return time.perf_counter() - t0


def lean_roles(
    model: Any, tokenizer: Any, texts: Sequence[str], roles: dict[str, list[int]], batch_size: int
) -> dict[str, float]:
    """Lean-forward seconds of the build, held-out and swap records."""
    return {
        r: lean_forward(model, tokenizer, [texts[i] for i in roles[r]], batch_size)
        for r in ("build", "heldout", "swaps")
    }


# --------------------------------------------------------------------------- swaps suffix
def downstream_conditions(head: dict[str, Any]) -> int:
    """Conditions of one head (``run.json`` entry) measured downstream: every swap condition,
    the ceiling and every random draw with a ``logprob_shift``."""
    sw = head.get("swaps") or {}
    if sw.get("skipped"):
        return 0
    n = 0
    for cond in (sw.get("conditions") or {}).values():
        if cond.get("logprob_shift") is not None:
            n += 1
        n += len(((cond.get("random") or {}).get("logprob_shift") or {}).get("draws") or [])
    ceiling = sw.get("ceiling") or {}
    if ceiling.get("logprob_shift") is not None:
        n += 1
    return n


def suffix_seconds(run_json: dict[str, Any], n_layers: int, per_record_s: float) -> list[dict]:
    """Per head: downstream conditions, swap prompts, layer fraction and the suffix's limit."""
    out = []
    for h in run_json.get("heads", []):
        n_cond = downstream_conditions(h)
        n_prompts = int((h.get("swaps") or {}).get("n") or 0)
        frac = (n_layers - int(h["layer"])) / n_layers
        out.append({"head": f"L{h['layer']}H{h['head']}", "conditions": n_cond,
                    "prompts": n_prompts, "layer_fraction": frac,
                    "seconds": n_cond * n_prompts * frac * per_record_s})  # fmt: skip
    return out


# --------------------------------------------------------------------------- memory
def _hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1)) * 1024


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1)) * 1024


class _PeakProbe:
    """Peak memory above the start of each phase (max over repeated entries of a phase)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peaks: dict[str, int] = {}
        self.absolute = 0  # highest absolute peak seen (weights included)
        self.cpu_ok = True

    def start(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return torch.cuda.memory_allocated(self.device)
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
        except OSError:
            self.cpu_ok = False
        return _rss_bytes()

    def stop(self, name: str, base: int) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = _hwm_bytes() if self.cpu_ok else _rss_bytes()
        self.peaks[name] = max(self.peaks.get(name, 0), peak - base)
        self.absolute = max(self.absolute, peak)


@contextlib.contextmanager
def phase_peaks(device: torch.device) -> Iterator[_PeakProbe]:
    """Record each ``Timer.phase``'s peak memory while the block runs."""
    from qkcov.runtime import Timer

    probe = _PeakProbe(device)
    orig = Timer.phase

    @contextlib.contextmanager
    def phase(self: Any, name: str) -> Iterator[None]:
        base = probe.start()
        try:
            with orig(self, name):
                yield
        finally:
            probe.stop(name, base)

    Timer.phase = phase  # type: ignore[method-assign]
    try:
        yield probe
    finally:
        Timer.phase = orig  # type: ignore[method-assign]


def memory_formula(model: Any, resolved: Sequence[Any], roles: dict[str, list[int]], cfg: Any,
                   n_heads_studied: int, n_groups: int) -> dict[str, int]:  # fmt: skip
    """Bytes beyond the weights per phase, from the table in docs/research-scale.md."""
    from qkcov.models.loading import model_info

    info = model_info(model)
    p = next(model.parameters())
    b = p.element_size()
    d = int(model.config.hidden_size)
    V = int(model.config.vocab_size)
    D, L, H = info.head_dim, info.n_layers, info.n_heads
    S = max(len(r.input_ids) for r in resolved)
    B, h = cfg.batch_size, n_heads_studied
    n_layers_studied = min(h, L)  # at most one layer per head (an upper bound)
    n_build = len(roles["build"])
    proj_recs = roles["centroid"] + roles["heldout"] if roles["centroid"] else []
    keys = statistics.mean(len(resolved[i].keys) for i in proj_recs) if proj_recs else 0.0
    forward = B * S * d * b
    terms = {
        # the scan rows, and (--heads auto's one pass) every head's q/k at the build sites
        "scan": forward
        + len(roles["scan"]) * L * H * S * 4
        + sum(1 + len(resolved[i].keys) for i in roles["build"]) * L * H * D * b,
        "contrast": forward + h * (n_groups + 1) * 2 * D * D * 8 + h * n_build * (3 * D + 3) * 8,
        "subspaces": cfg.n_permutations * D * D * 8,
        "projections": int(h * len(proj_recs) * (1 + keys) * D * 4),
        # one LM-head output (the shared base is already held when the phase starts)
        "swaps": forward + 64 * V * 4,
        "attribution": h * len(roles["attribution"]) * S * D * 8,
        "token_view": forward,
    }
    # the projections' and attribution's vectors are collected in one "collect" phase, which
    # also captures the swaps' shared base: the hidden state per studied layer, q/k per head
    base = len(roles["swaps"]) * S * (n_layers_studied * d * b + h * D * 8)
    terms["collect"] = forward + terms["projections"] + terms["attribution"] + base
    terms["weights"] = sum(q.numel() * q.element_size() for q in model.parameters())
    return terms


# --------------------------------------------------------------------------- one config
@dataclass
class Measurement:
    n_records: int
    n_heads: int
    roles: dict[str, int]
    runs: list[dict[str, Any]] = field(default_factory=list)  # per run: wall, timings, limits
    memory: dict[str, int] = field(default_factory=dict)
    formula: dict[str, int] = field(default_factory=dict)
    memory_kind: str = "rss"
    peak: int = 0  # highest absolute peak over every phase (bytes, weights included)


def measure(model: Any, tokenizer: Any, records: Sequence[Any], cfg: Any, *, repeats: int = 1,
            workdir: str | Path | None = None) -> Measurement:  # fmt: skip
    """``repeats`` runs of ``pipeline.run`` interleaved with lean forwards of each role."""
    from qkcov.engine.contrast import resolve_records
    from qkcov.models.loading import input_device, model_info
    from qkcov.pipeline import plan_records, run

    plan = plan_records(records, cfg)
    roles = role_indices(plan, cfg)
    resolved = resolve_records(tokenizer, plan.records, chat=cfg.chat)
    texts = [r.text for r in resolved]
    device = input_device(model)
    n_layers = model_info(model).n_layers
    m = Measurement(len(records), 0, {k: len(v) for k, v in roles.items()},
                    memory_kind="cuda" if device.type == "cuda" else "rss")  # fmt: skip
    lean_forward(model, tokenizer, texts[: cfg.batch_size], cfg.batch_size)  # warm-up
    leans = [lean_roles(model, tokenizer, texts, roles, cfg.batch_size)]
    tmp = tempfile.TemporaryDirectory(dir=workdir)
    try:
        for rep in range(repeats):
            out = Path(tmp.name) / f"run{rep}"
            with phase_peaks(device) as probe:
                t0 = time.perf_counter()
                result = run(cfg, list(records), out, quiet=True, loaded=(model, tokenizer))
                _sync(device)
                wall = time.perf_counter() - t0
            for k, v in probe.peaks.items():
                m.memory[k] = max(m.memory.get(k, 0), v)
            m.peak = max(m.peak, probe.absolute)
            leans.append(lean_roles(model, tokenizer, texts, roles, cfg.batch_size))
            lean = {r: (leans[-2][r] + leans[-1][r]) / 2 for r in leans[-1]}
            run_json = json.loads((out / "run.json").read_text())
            n_swap = max(1, len(roles["swaps"]))
            suffix = suffix_seconds(run_json, n_layers, lean["swaps"] / n_swap)
            m.n_heads = len(run_json.get("heads", []))
            m.runs.append({"wall": wall, "timings": dict(result.timings), "lean": lean,
                           "lean_before_after": (sum(leans[-2].values()), sum(leans[-1].values())),
                           "suffix": suffix})  # fmt: skip
        groups = {resolved[i].record.group for i in roles["build"]}
        m.formula = memory_formula(model, resolved, roles, cfg, m.n_heads, len(groups - {None}))
    finally:
        tmp.cleanup()
    return m


def phase_limits(run: dict[str, Any]) -> dict[str, float]:
    """Limit seconds of each role for one run."""
    lean = run["lean"]
    suffix = sum(s["seconds"] for s in run["suffix"])
    return {"build": lean["build"], "heldout": lean["heldout"], "swaps": suffix,
            "suffix": suffix, "run": lean["build"] + lean["heldout"] + suffix}  # fmt: skip


def role_of(phase: str) -> str | None:
    return PHASE_ROLE.get(phase)


def run_over_limit(run: dict[str, Any]) -> float:
    return run["wall"] / phase_limits(run)["run"]


def report(m: Measurement) -> list[str]:
    """Printable lines of one measurement (the median run by run_over_limit)."""
    runs = sorted(m.runs, key=run_over_limit)
    r = runs[len(runs) // 2]
    lim = phase_limits(r)
    timings = dict(r["timings"])
    timings[OUTSIDE] = max(0.0, r["wall"] - sum(timings.values()))
    lines = [
        f"== records={m.n_records} heads={m.n_heads} runs={len(m.runs)} "
        f"(build {m.roles['build']}, held-out {m.roles['heldout']}, swaps {m.roles['swaps']}) ==",
        "lean forward: " + ", ".join(f"{k} {v:.2f} s" for k, v in r["lean"].items())
        + " (all roles before / after the run: {:.2f} / {:.2f} s)".format(*r["lean_before_after"])
        + f"; swap suffix {lim['suffix']:.2f} s = "
        + " + ".join(f"{s['head']} {s['conditions']}×{s['prompts']}×{s['layer_fraction']:.2f}"
                     for s in r["suffix"]),
        f"{'phase':<18}{'seconds':>9}{'share':>8}{'limit_s':>9}{'ratio':>8}  role",
    ]  # fmt: skip
    per_role: dict[str, float] = {}
    for name, sec in timings.items():
        role = role_of(name)
        share = sec / r["wall"]
        if role is None:
            what = "no forward" + (
                "" if name in NO_FORWARD or name == OUTSIDE else " (unknown phase)"
            )
            lines.append(f"{name:<18}{sec:9.2f}{share:8.1%}{'-':>9}{'-':>8}  {what}")
            continue
        per_role[role] = per_role.get(role, 0.0) + sec
        ratio = sec / lim[role] if lim[role] > 0 else float("inf")
        lines.append(f"{name:<18}{sec:9.2f}{share:8.1%}{lim[role]:9.2f}{ratio:8.2f}  {role}")
    for role, sec in per_role.items():
        ratio = sec / lim[role] if lim[role] > 0 else float("inf")
        lines.append(f"[{role}] phases {sec:.2f} s / limit {lim[role]:.2f} s = {ratio:.2f}")
    unit = (
        "peak RSS above phase start"
        if m.memory_kind == "rss"
        else "CUDA max allocated above phase start"
    )
    lines.append(f"memory ({unit}, MiB) vs docs/research-scale.md formula (MiB, beyond the "
                 f"{m.formula.get('weights', 0) / MIB:.0f} MiB of weights):")  # fmt: skip
    for name, peak in m.memory.items():
        f = m.formula.get(name)
        lines.append(
            f"  {name:<16}{peak / MIB:9.2f}  formula " + ("-" if f is None else f"{f / MIB:.2f}")
        )
    ratios = [run_over_limit(x) for x in m.runs]
    lines.append(
        f"run {r['wall']:.1f} s / limit {lim['run']:.2f} s (build {r['lean']['build']:.2f} + "
        f"held-out {r['lean']['heldout']:.2f} + suffix {lim['suffix']:.2f})"
        + (f"; all runs {[round(x, 2) for x in ratios]}" if len(ratios) > 1 else "")
    )
    lines.append(f"run_over_limit={run_over_limit(r):.2f}")
    return lines


def summary(ms: Sequence[Measurement]) -> list[str]:
    """Scaling lines: cost vs records (same heads) and vs heads (same records)."""
    walls = {(m.n_records, m.n_heads): statistics.median(x["wall"] for x in m.runs) for m in ms}
    lines = ["== summary: records heads wall_s run_over_limit =="]
    for m in ms:
        lines.append(f"{m.n_records:>6} {m.n_heads:>3} {walls[(m.n_records, m.n_heads)]:8.1f} "
                     f"{statistics.median(run_over_limit(x) for x in m.runs):6.2f}")  # fmt: skip
    recs = sorted({k[0] for k in walls})
    heads = sorted({k[1] for k in walls})
    for h in heads:
        if len(recs) > 1 and (recs[0], h) in walls and (recs[-1], h) in walls:
            lines.append(f"records {recs[-1]} vs {recs[0]} at {h} heads: "
                         f"{walls[(recs[-1], h)] / walls[(recs[0], h)]:.2f} x "
                         f"(records x {recs[-1] / recs[0]:.1f})")  # fmt: skip
    for n in recs:
        if len(heads) > 1 and (n, heads[0]) in walls and (n, heads[-1]) in walls:
            lines.append(f"heads {heads[-1]} vs {heads[0]} at {n} records: "
                         f"{walls[(n, heads[-1])] / walls[(n, heads[0])]:.2f} x "
                         f"(heads x {heads[-1] / heads[0]:.1f})")  # fmt: skip
    return lines


def _ints(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        out = []
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers like 240,960, got {text!r}")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--records", type=_ints, default=[240, 960], help="e.g. 240,960")
    p.add_argument("--heads", type=_ints, default=[1, 3, 8], help="auto:K for each K, e.g. 1,3,8")
    p.add_argument("--quick", action="store_true", help="240 records x 3 heads only")
    p.add_argument("--repeats", type=int, default=1, help="runs per configuration")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="auto", help="forward dtype (auto = float32)")
    p.add_argument("--batch-size", type=int, default=8)
    args = p.parse_args(argv)
    if args.quick:
        args.records, args.heads = [240], [3]
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"--device {args.device}: no CUDA device is available")
        return 1
    from qkcov.models.loading import load_model
    from qkcov.pipeline import RunConfig
    from qkcov.tasks.builtin import build_task_records

    lm = load_model(args.model, device=args.device,
                    dtype=None if args.dtype == "auto" else args.dtype)  # fmt: skip
    print(f"model={lm.name} device={args.device} dtype={next(lm.model.parameters()).dtype} "
          f"threads={torch.get_num_threads()} batch_size={args.batch_size}", flush=True)  # fmt: skip
    ms = []
    for n in args.records:
        records = build_task_records("agreement", n=n)
        for k in args.heads:
            cfg = RunConfig(heads=f"auto:{k}", device=args.device, batch_size=args.batch_size)
            m = measure(lm.model, lm.tokenizer, records, cfg, repeats=args.repeats)
            ms.append(m)
            print("\n".join(report(m)), flush=True)
    if len(ms) > 1:
        print("\n".join(summary(ms)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
