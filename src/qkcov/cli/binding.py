"""``qkcov binding``: order-ID and lexical binding features of box-letter heads (Figs. 8–10)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

__all__ = ["register", "run"]

_DESCRIPTION = """\
Binding features (paper Figs. 8-10). Prompts such as
  "The apple is in Box C, the key is in Box F, ... Which box is the key in? Box"
are scored by the model (accuracy = argmax of the next-token score over the candidate
letters). Heads whose last-token attention prefers the answer letter are selected; for
each, two contrastive covariances are estimated:
  order-ID  positive = the answer's letter, negatives = the other letters, the queried
            object and its bindings fixed while the answer's position varies;
  lexical   the same letter when the queried object is bound to it vs when the question
            asks about an object absent from an otherwise identical prompt.
Then: projections onto both subspaces (Fig. 8), in-forward swaps of the answer letter's key
with another letter's key inside each subspace vs equal-rank random subspaces and the
full-key swap (Fig. 9), and exact attribution of the attention logits to the order part,
the lexical part and the residual of the query (Fig. 10).

Writes OUT/binding.json, OUT/binding.safetensors, figures and OUT/section.json."""


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "binding",
        help="binding features: order-ID / lexical subspaces, swaps, attribution (Fig. 8-10)",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from ..experiments.binding import BindingConfig

    d = BindingConfig.__dataclass_fields__
    p.add_argument(
        "--model", default=d["model"].default, help="preset, path or hub id (default %(default)s)"
    )
    p.add_argument("--out", required=True, type=Path, help="output folder (created if missing)")
    p.add_argument(
        "--pairs",
        type=int,
        default=d["n_pairs"].default,
        help="object/box pairs per prompt, 2-9 (default %(default)s)",
    )
    p.add_argument(
        "--heads", default="auto", help="'auto', 'auto:K' or a list like 'L3H4,L5H1' (default auto)"
    )
    p.add_argument(
        "--n-heads",
        type=int,
        default=d["n_heads"].default,
        help="heads picked by 'auto' (default %(default)s)",
    )
    p.add_argument("--chat", action="store_true", help="wrap prompts in the model's chat template")
    p.add_argument(
        "--n-build",
        type=int,
        default=d["n_build"].default,
        help="records per design for ΔC (default %(default)s)",
    )
    p.add_argument(
        "--n-heldout",
        type=int,
        default=d["n_heldout"].default,
        help="held-out records per design (default %(default)s)",
    )
    p.add_argument(
        "--n-swap",
        type=int,
        default=d["n_swap"].default,
        help="held-out prompts used for the swaps, 0 = all (default %(default)s)",
    )
    p.add_argument(
        "--energy",
        type=float,
        default=d["energy"].default,
        help="energy threshold for ranks (default %(default)s)",
    )
    p.add_argument(
        "--n-random",
        type=int,
        default=d["n_random"].default,
        help="random equal-rank subspaces per swap condition, >= 10 (default %(default)s)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=d["batch_size"].default,
        help="prompts per forward pass (default %(default)s)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    p.add_argument(
        "--priority",
        default="order",
        choices=["order", "lexical"],
        help="attribution: which subspace keeps the overlap (default order)",
    )
    p.add_argument(
        "--sweep",
        default=None,
        help="also measure accuracy for these pair counts, e.g. '2,3,4,5' (plain and chat)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=run)  # fmt: skip


def _parse_sweep(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--sweep must be comma-separated integers, got {text!r}") from None
    from ..tasks.binding import MAX_PAIRS, MIN_PAIRS

    bad = [v for v in vals if not MIN_PAIRS <= v <= MAX_PAIRS]
    if bad:
        raise ValueError(f"--sweep: pair counts must be in [{MIN_PAIRS}, {MAX_PAIRS}], got {bad}")
    return vals


def run(args: argparse.Namespace) -> int:
    from ..experiments.binding import BindingConfig, run_binding

    cfg = BindingConfig(
        model=args.model,
        n_pairs=args.pairs,
        chat=args.chat,
        heads=args.heads,
        n_heads=args.n_heads,
        n_build=args.n_build,
        n_heldout=args.n_heldout,
        n_swap=args.n_swap,
        energy=args.energy,
        n_random=args.n_random,
        batch_size=args.batch_size,
        seed=args.seed,
        priority=args.priority,
    )
    sweep = _parse_sweep(args.sweep)
    result = run_binding(cfg, args.out, progress=not args.quiet, sweep=sweep)
    acc = result["accuracy"]
    summary = {
        "accuracy": round(acc["accuracy"], 3),
        "chance": round(acc["chance"], 3),
        "heads": [
            {
                "head": h["name"],
                "rank_order": h["rank_order"],
                "rank_lexical": h["rank_lexical"],
                "order_delta_p": round(h["swap"].get("order", {}).get("delta_p", float("nan")), 3),
                "random_delta_p": round(
                    h["random"].get("order", {}).get("delta_p", {}).get("mean", float("nan")), 3
                ),
                "ceiling_delta_p": round(h["ceiling"]["delta_p"], 3),
                "explained_fraction": round(h["explained_fraction"], 3),
            }
            for h in result["heads"]
        ],
        "seconds": result["timings"]["total"],
    }
    print(json.dumps(summary, indent=2))
    print(f"[binding] artifacts in {args.out}")
    return 0
