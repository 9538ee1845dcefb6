"""``qkcov toy ...``: the simplified-setting experiments (paper Fig. 2–5)."""

from __future__ import annotations

import argparse
import functools
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["register"]

_DESCRIPTION = """\
Toy ("simplified setting") experiments. Each context token is x_i = A1 z1_i + A2 z2_i +
e(payload_i) + noise; the query x_q = B1 z1* + B2 z2* + noise copies the latents of one
target token. A single attention head is trained to return the target's payload; the
contrastive covariance ΔC of its queries and keys then recovers a rank-N subspace for z1
and a rank-M subspace for z2.

  ranks        Fig. 2: train a grid of cells (N, M in --n-values/--m-values, both
               variants) and record the recovered rank of ΔC(z1), ΔC(z2) per cell.
  projections  Fig. 3: queries/keys of one cell projected onto the z1 and z2 subspaces.
  swap         Fig. 4: swap two keys' coordinates inside a subspace and see attention move.
  interaction  Fig. 5: latent interaction matrix G = (W_Q B)^T (W_K A) of one cell.
  all          everything above into OUT/{ranks,projections,swap,interaction}.

Every command writes JSON + safetensors artifacts, figures drawn from them, and a
section.json for `qkcov report OUT`. OUT is replaced as a whole when the run succeeds
(an interrupted run leaves the previous OUT untouched) and gets a manifest.json."""


def _common(p: argparse.ArgumentParser) -> None:
    from .common import add_out_flags

    add_out_flags(p, help="output folder (created if missing)")
    p.add_argument("--seed", type=int, default=0, help="seed for maps, init and data (default 0)")
    p.add_argument(
        "--n-pairs",
        type=int,
        default=None,
        help="contrast pairs per cell for each ΔC estimate (default 50000)",
    )
    p.add_argument(
        "--energy",
        type=float,
        default=0.99,
        help="cumulative singular-value energy that fixes the rank (default 0.99)",
    )
    p.add_argument(
        "--max-steps", type=int, default=None, help="cap on training steps (default 3000)"
    )
    p.add_argument(
        "--latent-norm",
        default="sphere",
        help="gaussian latents: sphere (z rescaled to norm sqrt(dim); the target is the unique "
        "dot-product maximiser, E[zz^T] = I unchanged) or raw (plain N(0, I); accuracy capped "
        "below 100%% for any dot-product head) (default sphere)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress output")


def _cell(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--variant",
        default="binary",
        help="latent distribution: binary (z in {-1,+1}) or gaussian (default binary)",
    )
    p.add_argument("--N", dest="n_z1", type=int, default=3, help="dimension of z1 (default 3)")
    p.add_argument("--M", dest="n_z2", type=int, default=3, help="dimension of z2 (default 3)")


def _grid(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--variants",
        nargs="+",
        default=["binary", "gaussian"],
        help="latent variants to train (default: binary gaussian)",
    )
    p.add_argument(
        "--n-values",
        nargs="+",
        type=int,
        default=[3, 5, 7],
        help="dimensions N of z1 (default 3 5 7)",
    )
    p.add_argument(
        "--m-values",
        nargs="+",
        type=int,
        default=[3, 5, 7],
        help="dimensions M of z2 (default 3 5 7)",
    )


def register(subparsers: Any) -> None:
    toy = subparsers.add_parser(
        "toy",
        help="simplified-setting experiments (Fig. 2-5)",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = toy.add_subparsers(dest="toy_command", metavar="<experiment>", required=True)
    specs = {
        "ranks": ("Fig. 2: recovered ranks over a grid of trained cells", _run_ranks, [_grid]),
        "projections": ("Fig. 3: projections onto the z1/z2 subspaces", _run_projections, [_cell]),
        "swap": ("Fig. 4: key swaps inside the subspaces vs random", _run_swap, [_cell]),
        "interaction": ("Fig. 5: latent interaction matrix", _run_interaction, [_cell]),
        "all": ("all four experiments (grid trained once)", _run_all, [_grid]),
    }
    for name, (help_text, func, extras) in specs.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        _common(p)
        for extra in extras:
            extra(p)
        if name in ("swap", "all"):
            p.add_argument(
                "--n-random",
                type=int,
                default=20,
                help="random subspaces averaged for the baseline (default 20)",
            )
            p.add_argument(
                "--n-sequences",
                type=int,
                default=2000,
                help="sequences per swap condition (default 2000)",
            )
        if name == "projections":
            p.add_argument(
                "--n-points", type=int, default=2000, help="points to project (default 2000)"
            )
        p.set_defaults(func=_in_run_folder(func))


# ------------------------------------------------------------------ handlers
def _in_run_folder(func: Callable[[argparse.Namespace], int]) -> Callable[..., int]:
    """Run ``func`` with ``args.out`` pointing at a :class:`~qkcov.artifacts.RunFolder` staging
    folder; ``--out`` is replaced by it only when ``func`` succeeds."""

    @functools.wraps(func)
    def run(args: argparse.Namespace) -> int:
        from ..artifacts import RunFolder

        out = args.out
        command = getattr(args, "command_line", None) or f"qkcov toy {args.toy_command}"
        with RunFolder(out, command=command, force=args.force) as stage:
            args.out = stage
            try:
                rc = func(args)
            finally:
                args.out = out
        print(f"[toy] artifacts in {out}")
        return rc

    return run


def _train_config(args: argparse.Namespace) -> Any:
    from ..toy.model import TrainConfig

    kw: dict[str, Any] = {"seed": args.seed}
    if args.max_steps is not None:
        kw["max_steps"] = args.max_steps
        kw["min_steps"] = min(TrainConfig().min_steps, args.max_steps)
    return TrainConfig(**kw)


def _pairs(args: argparse.Namespace) -> dict[str, Any]:
    from ..toy.analytic import DEFAULT_N_PAIRS

    return {"n_pairs": args.n_pairs or DEFAULT_N_PAIRS, "energy": args.energy}


def _one(args: argparse.Namespace) -> Any:
    from ..toy.data import ToyConfig

    return ToyConfig(
        variant=args.variant,
        n_z1=args.n_z1,
        n_z2=args.n_z2,
        seed=args.seed,
        latent_norm=args.latent_norm,
    )


def _done(out: Path, t0: float, payload: Any) -> int:
    print(json.dumps(payload, indent=2, default=str))
    print(f"[toy] done in {time.perf_counter() - t0:.1f}s")
    return 0


def _run_ranks(args: argparse.Namespace) -> int:
    from ..toy.experiments import grid_configs, run_ranks

    t0 = time.perf_counter()
    configs = grid_configs(
        args.variants, args.n_values, args.m_values, seed=args.seed, latent_norm=args.latent_norm
    )
    rows = run_ranks(
        args.out, configs, _train_config(args), progress=not args.quiet, **_pairs(args)
    )
    table = [
        {
            k: (round(v, 4) if isinstance(v, float) else v)
            for k, v in r.items()
            if k
            in (
                "variant",
                "latent_norm",
                "N",
                "M",
                "rank_z1",
                "rank_z2",
                "val_accuracy",
                "analytic_rel_err_z1",
                "analytic_rel_err_z2",
            )
        }
        for r in rows
    ]
    return _done(args.out, t0, table)


def _run_projections(args: argparse.Namespace) -> int:
    from ..toy.experiments import run_projections

    t0 = time.perf_counter()
    info = run_projections(
        args.out,
        _one(args),
        n_points=args.n_points,
        train_config=_train_config(args),
        seed=args.seed,
        progress=not args.quiet,
        **_pairs(args),
    )
    return _done(args.out, t0, {k: info[k] for k in ("rank_z1", "rank_z2", "n_points")})


def _run_swap(args: argparse.Namespace) -> int:
    from ..toy.experiments import run_swap

    t0 = time.perf_counter()
    info = run_swap(
        args.out,
        _one(args),
        n_sequences=args.n_sequences,
        n_random=args.n_random,
        train_config=_train_config(args),
        seed=args.seed,
        progress=not args.quiet,
        **_pairs(args),
    )
    rows = [
        {
            k: (round(v, 4) if isinstance(v, float) else v)
            for k, v in r.items()
            if k in ("condition", "subspace", "rank", "attn_orig_after", "attn_target_after")
        }
        for r in info["rows"]
    ]
    return _done(args.out, t0, rows)


def _run_interaction(args: argparse.Namespace) -> int:
    from ..toy.experiments import run_interaction

    t0 = time.perf_counter()
    info = run_interaction(
        args.out, _one(args), train_config=_train_config(args), progress=not args.quiet
    )
    return _done(
        args.out,
        t0,
        {
            "off_block_fraction": round(info["off_block_fraction"], 4),
            "G": [[round(x, 3) for x in row] for row in info["G"].tolist()],
        },
    )


def _run_all(args: argparse.Namespace) -> int:
    from ..toy.experiments import grid_configs, run_toy_all

    t0 = time.perf_counter()
    configs = grid_configs(
        args.variants, args.n_values, args.m_values, seed=args.seed, latent_norm=args.latent_norm
    )
    summary = run_toy_all(
        args.out,
        configs=configs,
        train_config=_train_config(args),
        n_random=args.n_random,
        n_sequences=args.n_sequences,
        progress=not args.quiet,
        **_pairs(args),
    )
    return _done(args.out, t0, summary)
