"""``qkcov filter``: categorical semantic features / filter heads (paper Figs. 6–7)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

__all__ = ["register", "run"]

_DESCRIPTION = """\
Filter heads. Prompts list items from several categories and ask "What are the <category>
in the list?"; the query is the last prompt token, keys are the items' last tokens,
positives the items of the asked category. Steps: scan every head's last-token attention
(asked-category items vs others), pick heads, estimate one ΔC per category plus a pooled ΔC
on build prompts, project held-out keys on the category subspace (Fig. 6) and swap keys
inside it in the forward pass against random equal-rank subspaces (Fig. 7).

Writes OUT/filter.json, OUT/filter.safetensors, figures and OUT/section.json."""


def register(subparsers: Any) -> None:
    from ..experiments.filter import SCAN_KEYS, FilterConfig
    from ..tasks.filter import TEMPLATES

    d = FilterConfig()
    p = subparsers.add_parser(
        "filter",
        help="filter heads: category subspaces, projections and key swaps (Fig. 6-7)",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default=d.model, help=f"preset, path or .gguf (default {d.model})")
    p.add_argument("--out", required=True, type=Path, help="output folder (created if missing)")
    p.add_argument(
        "--heads",
        default=d.heads,
        help="'auto' (top --n-heads of the scan), 'auto:K' or a list like L20H26,L16H19",
    )
    p.add_argument(
        "--n-heads", type=int, default=d.n_heads, help=f"heads for auto (default {d.n_heads})"
    )
    p.add_argument(
        "--scan-key",
        default=d.scan_key,
        choices=SCAN_KEYS,
        help=f"scan column that ranks heads (default {d.scan_key})",
    )
    p.add_argument(
        "--n-build", type=int, default=d.n_build, help=f"build prompts (default {d.n_build})"
    )
    p.add_argument(
        "--n-heldout",
        type=int,
        default=d.n_heldout,
        help=f"held-out prompts (default {d.n_heldout})",
    )
    p.add_argument(
        "--n-scan",
        type=int,
        default=d.n_scan,
        help=f"build prompts used for the head scan, 0 = all (default {d.n_scan})",
    )
    p.add_argument(
        "--n-swap",
        type=int,
        default=d.n_swap,
        help=f"held-out prompts used for swaps, 0 = all (default {d.n_swap})",
    )
    p.add_argument(
        "--swap-subspace",
        choices=("pooled", "union"),
        default=d.swap_subspace,
        help="headline swap condition: the pooled ΔC's key subspace (asked-category items vs "
        "the rest) or the union of per-category key subspaces; both are always run and saved "
        f"(default {d.swap_subspace})",
    )
    p.add_argument(
        "--n-centroid",
        type=int,
        default=d.n_centroid,
        help=f"build prompts whose keys fit the centroids, 0 = all (default {d.n_centroid})",
    )
    p.add_argument(
        "--categories",
        default=None,
        help="comma-separated category names (default: the whole built-in vocabulary)",
    )
    p.add_argument(
        "--n-categories-per-prompt",
        type=int,
        default=d.n_categories_per_prompt,
        help=f"categories listed per prompt (default {d.n_categories_per_prompt})",
    )
    p.add_argument(
        "--items-per-category",
        type=int,
        default=d.items_per_category,
        help=f"items of each listed category (default {d.items_per_category})",
    )
    p.add_argument("--template", default=d.template, choices=TEMPLATES, help="question form")
    p.add_argument("--chat", action="store_true", help="format prompts with the chat template")
    p.add_argument("--energy", type=float, default=d.energy, help="rank energy (default 0.99)")
    p.add_argument(
        "--n-random",
        type=int,
        default=d.n_random,
        help=f"random baselines, >=10 (default {d.n_random})",
    )
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="prompts per forward")
    p.add_argument("--seed", type=int, default=d.seed, help="seed (default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> Any:
    """A validated :class:`FilterConfig` from parsed arguments (``ValueError`` if invalid)."""
    from ..experiments.filter import FilterConfig

    cats = None
    if args.categories is not None:
        cats = tuple(c.strip() for c in args.categories.split(",") if c.strip())
    return FilterConfig(
        model=args.model,
        heads=args.heads,
        n_heads=args.n_heads,
        scan_key=args.scan_key,
        n_build=args.n_build,
        n_heldout=args.n_heldout,
        n_scan=args.n_scan,
        n_swap=args.n_swap,
        swap_subspace=args.swap_subspace,
        n_centroid=args.n_centroid,
        categories=cats,
        n_categories_per_prompt=args.n_categories_per_prompt,
        items_per_category=args.items_per_category,
        template=args.template,
        chat=args.chat,
        energy=args.energy,
        n_random=args.n_random,
        batch_size=args.batch_size,
        seed=args.seed,
    )


def run(args: argparse.Namespace) -> int:
    from ..experiments.filter import run_filter, summarize

    cfg = config_from_args(args)
    result = run_filter(cfg, args.out, progress=not args.quiet)
    print(json.dumps(summarize(result), indent=2))
    print(f"[filter] artifacts in {args.out}")
    return 0
