"""``qkcov contrast``: ΔC per head for any JSONL of contrast records."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["register", "run", "run_contrast_file"]

_DESCRIPTION = """\
Run a JSONL file of contrast records (docs/contrast-records.md) through a model: map spans
to token positions, accumulate ΔC = E[q k+^T] - E[q k-^T] per head and per record group (and
pooled), and split each ΔC into query/key subspaces at the energy threshold. The file is
validated first; nothing is computed or written from a file with an invalid line.

Writes OUT/contrast.json (per head: ranks, singular values, counts per group and pooled),
OUT/contrast.safetensors (ΔC and bases) and OUT/section.json."""


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "contrast",
        help="ΔC, ranks and subspaces per head for a JSONL of contrast records",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from ..models.loading import DEFAULT_MODEL

    p.add_argument(
        "--model", default=DEFAULT_MODEL, help=f"preset, path or .gguf (default {DEFAULT_MODEL})"
    )
    p.add_argument("--data", required=True, type=Path, help="JSONL file of contrast records")
    p.add_argument("--out", required=True, type=Path, help="output folder (created if missing)")
    p.add_argument(
        "--heads",
        default="auto",
        help="'auto' (scan every head first, keep the top --n-heads), 'auto:K' or L20H26,L16H19",
    )
    p.add_argument("--n-heads", type=int, default=3, help="heads kept by 'auto' (default 3)")
    p.add_argument("--chat", action="store_true", help="format prompts with the chat template")
    p.add_argument("--energy", type=float, default=0.99, help="rank energy (default 0.99)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per forward (default 8)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=run)


def _check_args(energy: float, batch_size: int, n_heads: int) -> None:
    from ..config import check_positive_int, check_range

    check_range("energy", energy, 0.0, 1.0, low_open=True)
    check_positive_int("batch_size", batch_size, 1)
    check_positive_int("n_heads", n_heads, 1)


def run_contrast_file(
    data: str | Path,
    out_dir: str | Path,
    *,
    model: str | None = None,
    heads: str = "auto",
    n_heads: int = 3,
    chat: bool = False,
    energy: float = 0.99,
    batch_size: int = 8,
    loaded: tuple[torch.nn.Module, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Records file → ``contrast.json`` + ``contrast.safetensors`` + ``section.json``.

    Everything is validated (records, heads, energy) before the output folder is touched.
    Returns the content of ``contrast.json``.
    """
    from ..artifacts import save_tensors, write_json
    from ..engine.contrast import POOLED, resolve_records, run_contrast
    from ..engine.scan import attention_rows, check_heads_spec, scan_heads, select_heads
    from ..models.heads import format_head
    from ..models.loading import DEFAULT_MODEL, model_info
    from ..tasks.records import load_records

    t0 = time.perf_counter()
    _check_args(energy, batch_size, n_heads)
    check_heads_spec(heads)
    records = load_records(data)  # raises one error listing every bad line
    model_name = model or DEFAULT_MODEL
    if loaded is None:
        from ..models.loading import load_model

        lm = load_model(model_name)
        loaded = (lm.model, lm.tokenizer)
    mdl, tok = loaded
    info = model_info(mdl)
    resolved = resolve_records(tok, records, chat=chat)
    scan: list[dict[str, Any]] | None = None
    if heads.strip().lower().startswith("auto"):
        rows = attention_rows(mdl, tok, resolved, batch_size=batch_size, progress=progress)
        scan = scan_heads(rows, resolved)
    chosen = select_heads(heads, scan, info.n_layers, info.n_heads, k=n_heads)
    result = run_contrast(mdl, tok, resolved, chosen, batch_size=batch_size, progress=progress)

    tensors: dict[str, torch.Tensor] = {}
    head_rows = []
    for h in chosen:
        name = format_head(*h)
        subs = result.subspaces(h, energy)
        acc = result.accumulators[h]
        entry: dict[str, Any] = {"layer": h[0], "head": h[1], "name": name}
        entry["ranks"] = {g: s.rank for g, s in subs.items()}
        groups = [g for g in subs if g != POOLED]
        if len(groups) > 1:
            entry["ranks"]["union"] = int(result.union_key_basis(h, energy).shape[1])
        entry["singular_values"] = {g: s.singular_values.tolist() for g, s in subs.items()}
        entry["counts"] = {
            g: dict(zip(("n_pos", "n_neg"), acc.counts(g), strict=True)) for g in result.groups
        }
        entry["counts"][POOLED] = dict(zip(("n_pos", "n_neg"), acc.counts(None), strict=True))
        skipped = [g for g in result.groups if g not in subs]
        if skipped:
            entry["groups_without_both_sides"] = skipped
        for g, s in subs.items():
            tensors[f"{name}.{g}.delta"] = result.delta(h, g).float()
            for k, v in s.to_tensors(f"{name}.{g}.").items():
                tensors[k] = v.float()
        head_rows.append(entry)
    payload: dict[str, Any] = {
        "model": model_name if model or loaded is None else type(mdl).__name__,
        "data": str(data),
        "n_records": len(records),
        "chat": chat,
        "energy": energy,
        "groups": result.groups,
        "heads_spec": heads,
        "heads": head_rows,
        "scan": scan,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_tensors(out / "contrast.safetensors", tensors, {"heads": [r["name"] for r in head_rows]})
    write_json(out / "contrast.json", payload)
    _section(out, payload)
    return payload


def _section(out: Path, payload: dict[str, Any]) -> None:
    from ..report import write_section

    rows = []
    for h in payload["heads"]:
        for g, r in h["ranks"].items():
            c = h["counts"].get(g, {})
            rows.append([h["name"], g, r, c.get("n_pos", ""), c.get("n_neg", "")])
    tables = [
        {
            "caption": "Rank per head and group",
            "columns": ["head", "group", "rank", "n+", "n-"],
            "rows": rows,
        }
    ]
    if payload["scan"]:
        tables.append(
            {
                "caption": "Head scan (top 10 by attention difference positives − negatives)",
                "columns": ["head", "diff", "ratio", "top match"],
                "rows": [
                    [r["name"], round(r["diff"], 4), round(r["ratio"], 3), round(r["top_match"], 3)]
                    for r in payload["scan"][:10]
                ],
            }
        )
    write_section(
        out,
        key=f"contrast-{Path(payload['data']).stem}",
        title=f"Contrastive covariance: {Path(payload['data']).name}",
        order=50,
        summary={
            "model": payload["model"],
            "records": payload["n_records"],
            "groups": len(payload["groups"]),
            "heads": ", ".join(h["name"] for h in payload["heads"]),
        },
        text=[
            f"ΔC per head and group from {payload['n_records']} records; ranks at energy "
            f"{payload['energy']}."
        ],
        tables=tables,
    )


def run(args: argparse.Namespace) -> int:
    payload = run_contrast_file(
        args.data,
        args.out,
        model=args.model,
        heads=args.heads,
        n_heads=args.n_heads,
        chat=args.chat,
        energy=args.energy,
        batch_size=args.batch_size,
        progress=not args.quiet,
    )
    summary: Sequence[dict[str, Any]] = [
        {"head": h["name"], "ranks": h["ranks"]} for h in payload["heads"]
    ]
    print(json.dumps(summary, indent=2))
    print(f"[contrast] artifacts in {args.out}")
    return 0
