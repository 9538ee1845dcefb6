"""The run as a list of named steps: :func:`analyze` (notebook) and :func:`run` (``qkcov
run`` and the built-in tasks) plan the records (:mod:`.plan`), then :func:`_analyze` calls
resolve → scan (``--heads auto``: in the one forward over the build records that also
captures every head's q/k, so ΔC needs no forward of its own) → ΔC + significance → collection → one :func:`~.steps.head._head_step` per
head (subspaces, projections, swaps, token view, attribution, position, verdict); ``run``
writes the run folder. Each step lives in :mod:`qkcov.pipeline.steps`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..results import AnalysisResult
from ..runtime import Timer
from ..tasks.records import ContrastRecord
from .config import RunConfig, auto_device, provenance
from .plan import Plan, plan_records, record_subsets
from .state import RunState, check_resume
from .steps.collect import _collect_step
from .steps.contrast import _contrast_step, _duplicate_notes, _feature_info, _zero_delta_notes
from .steps.head import HeadInputs, _head_step
from .steps.load import _load_step
from .steps.position import _rotary
from .steps.resolve import _resolve_step
from .steps.scan import _explicit_heads, _scan_step
from .steps.swaps import SwapBase
from .steps.write import _write_step


def analyze(
    model: torch.nn.Module,
    tokenizer: Any,
    records: Sequence[ContrastRecord | Mapping[str, Any]],
    *,
    config: RunConfig | None = None,
    progress: bool = True,
    **overrides: Any,
) -> AnalysisResult:
    """The whole method on a model you loaded (any device) and your records.

    >>> result = qkcov.analyze(model, tokenizer, records, heads="auto")   # doctest: +SKIP
    >>> print(result.summary()); result.report("out/")                    # doctest: +SKIP

    ``records``: :class:`ContrastRecord` objects or dicts in the JSONL schema. ``overrides``
    are :class:`RunConfig` fields (``heads``, ``n_random``, ``seed``, ...).
    """
    from ..checks import check_notebook_inputs

    records = check_notebook_inputs(model, tokenizer, records, config, overrides)
    cfg = dataclasses.replace(config, **overrides) if config is not None else RunConfig(**overrides)
    plan = plan_records(records, cfg)
    result = _analyze(
        model, tokenizer, plan, cfg, Timer("run", quiet=not progress), model_name=None
    )
    result.provenance = provenance(model, plan, None, None)
    return result


def _model_name(model: Any, given: str | None) -> str:
    """The canonical model name (a preset's name even when loaded from its files by path)."""
    from ..models.identity import canonical_name, model_identity

    return canonical_name(given) if given else model_identity(model)["name"]


def _analyze(
    model: Any, tokenizer: Any, plan: Plan, cfg: RunConfig, timer: Timer,
    model_name: str | None, state: RunState | None = None, dist: Any = None,
    one_pass: bool = True,
) -> AnalysisResult:  # fmt: skip
    """The steps of a run on a loaded model, in order (see the module docstring).
    ``one_pass=False``: ``--heads auto`` scans in its own forward before the ΔC forward (the
    former two-pass path, kept for the test that the one pass equals it)."""
    from ..engine.position import offset_diagnostics
    from ..engine.scan import select_heads
    from ..models.loading import model_info

    info = model_info(model)
    specs, no_rotary = _rotary(model, info.n_layers, cfg.frame)
    if not cfg.heads.strip().lower().startswith("auto"):
        _explicit_heads(cfg.heads, info)  # a head the model lacks: refused before any pass
    else:  # auto:K beyond the model's heads: refused before the scan
        from ..engine.scan import check_auto_count

        check_auto_count(cfg.heads, info.n_layers, info.n_heads)
    with timer.phase("resolve"):
        resolved = _resolve_step(model, tokenizer, plan, cfg)
    subsets = record_subsets(plan, cfg)
    with timer.phase("scan"):  # auto: one forward over the build records for scan and ΔC
        scan, captured = _scan_step(
            model, tokenizer, resolved, plan, subsets["scan"], cfg, info, timer, state, dist,
            one_pass=one_pass,
        )  # fmt: skip
    heads = select_heads(cfg.heads, scan, info.n_layers, info.n_heads, k=cfg.n_heads)
    timer.log(f"heads: {', '.join(f'L{l}H{h}' for l, h in heads)}")
    offsets, offset_warnings = offset_diagnostics(
        {f: [resolved[i] for i in plan.indices("build", f)] for f in plan.features}
    )
    for w in offset_warnings:
        timer.log(w)
    held, cent = subsets["projections"], subsets["centroid"]
    with timer.phase("contrast"):
        contrast = _contrast_step(
            model, tokenizer, resolved, plan, heads, cent, cfg, timer, state, dist, captured
        )
    captured = None  # every head's q/k: only the chosen heads' ΔC is kept
    done = state.load_heads(heads) if state is not None else {}
    todo = [h for h in heads if h not in done]
    swap_records = [resolved[i] for i in subsets["swaps"]]
    swap_base = SwapBase(
        model, tokenizer, swap_records, todo, cfg, specs, not timer.quiet, dist
    )  # fmt: skip
    with timer.phase("collect"):  # one forward per held-out record: the swap records' is the base
        collected = _collect_step(
            model, tokenizer, resolved, todo, cent, held, subsets["attribution"],
            contrast.cent_vecs, cfg, timer, dist,
            swap_base() if swap_records and todo else None, subsets["swaps"],
        )  # fmt: skip
    inputs = HeadInputs(
        model, tokenizer, plan, cfg, timer, resolved, cent, held, swap_records, contrast,
        collected, swap_base, scan, specs, no_rotary,
    )  # fmt: skip
    head_results = []
    for head in heads:
        if head in done:
            timer.log(f"L{head[0]}H{head[1]}: resumed from the checkpoint")
            head_results.append(done[head])
            continue
        head_results.append(_head_step(inputs, head))
        if state is not None:
            state.save_head(head_results[-1])
    swap_base.clear()  # the swap base's hidden states
    plan.notes.extend(_duplicate_notes(head_results))
    plan.notes.extend(_zero_delta_notes(head_results))
    return AnalysisResult(
        config=cfg.to_dict(),
        model=_model_name(model, model_name),
        model_info=dataclasses.asdict(info),
        features=_feature_info(plan, contrast),
        n_records=len(plan.records),
        heads=head_results,
        scan=scan,
        timings=dict(timer.seconds),
        seconds=timer.total(),
        notes=list(plan.notes) + offset_warnings,
        position={"frame": cfg.frame, "offsets": offsets},
    )


def run(
    cfg: RunConfig,
    records: str | Path | Sequence[ContrastRecord],
    out_dir: str | Path,
    *,
    quiet: bool = False,
    loaded: tuple[torch.nn.Module, Any] | None = None,
    section: Mapping[str, Any] | None = None,
    extras: Callable[[Any, Any, list[ContrastRecord], RunConfig], list[dict[str, Any]]]
    | None = None,
    resume: bool = False,
    force: bool = False,
    command_line: str | None = None,
) -> AnalysisResult:
    """``qkcov run``: records (a JSONL path or records) → ``out_dir`` with ``run.json``,
    ``run.safetensors``, figures, ``section.json`` and ``report.html``.

    Every input is checked (records, split, flags, output folder) before the model loads.
    Under ``torchrun`` records are sharded by whole batches over the ranks and rank 0 writes.
    ``resume=True`` continues from the checkpoints of an interrupted run (``checkpoint_every``).
    An existing ``out_dir`` is replaced only when empty or a complete qkcov run; ``force=True``
    writes the run inside any other folder, keeping files qkcov did not write.
    ``section`` overrides the report section's title/key/text and ``extras(model, tokenizer,
    records, cfg)`` adds task-specific tables to it (the built-in tasks use both).
    """
    from ..artifacts import RunFolder
    from ..engine.distributed import Dist
    from ..models.loading import resolve_device
    from ..tasks.records import load_records

    timer = Timer("run", quiet=quiet)
    recs = load_records(records) if isinstance(records, (str, Path)) else list(records)
    plan = plan_records(recs, cfg)
    auto = cfg.device.strip().lower() == "auto"
    if auto:
        cfg = dataclasses.replace(cfg, device=auto_device(cfg.device))
    resolve_device(cfg.device)  # --device cuda without CUDA: refused before anything is written
    if loaded is None:  # --heads L99H0: refused from the model's config, before the weights
        from ..models.loading import check_heads_config

        check_heads_config(cfg.heads, cfg.model, trust_remote_code=cfg.trust_remote_code)
    dist = Dist.from_env(cfg.device)
    # --out is checked and locked before the model loads; rank 0 alone writes artifacts
    protect = [records] if isinstance(records, (str, Path)) else []
    if resume:  # nothing to resume: refused before the folder check says it replaces a run
        check_resume(out_dir)
    folder = (
        RunFolder(out_dir, command="run", force=force, protect=protect) if dist.is_main else None
    )
    state = None
    try:
        state = RunState(out_dir, cfg, recs, resume=resume, dist=dist)
        if loaded is None and cfg.frame == "query":
            from ..models.rotary import check_frame_config

            check_frame_config(cfg.model, cfg.trust_remote_code)  # before the weights load
        if auto:  # said once every input (--out, --resume, --frame) has been checked
            timer.log(f"device: {cfg.device} (--device auto)")
        model, tokenizer = loaded if loaded is not None else _load_step(cfg, dist, timer)
        result = _analyze(
            model, tokenizer, plan, cfg, timer, cfg.model, state, dist if dist.enabled else None
        )
        result.provenance = provenance(
            model, plan, records if isinstance(records, (str, Path)) else None, command_line
        )
        section = dict(section or {})
        if extras is not None:
            with timer.phase("extras"):
                section["extra_tables"] = extras(model, tokenizer, plan.records, cfg)
        if folder is not None:
            _write_step(folder, result, section, timer)
        state.finish()
    except BaseException:
        if state is not None:
            state.discard_if_empty()  # refused before any work: leave nothing beside --out
        raise
    finally:
        if folder is not None:
            folder.close()
    return result
