"""``qkcov verify``: captured q/k reproduce the model's own eager attention weights."""

from __future__ import annotations

import argparse
import json

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    from ..pipeline import RunConfig
    from .common import add_config_flags

    p = subparsers.add_parser(
        "verify",
        help="check captured q/k reproduce the model's eager attention (all layers/heads)",
        description=(
            "Capture q/k of every token, layer and head for a batch of prompts of different "
            "lengths (padded left and right), recompute softmax attention from them and compare "
            "with the model's own eager attention weights. Prints one JSON object; exit status 1 "
            "when the max absolute difference exceeds the tolerance."
        ),
    )
    add_config_flags(p, RunConfig, only=("model", "device", "dtype", "device_map"))
    p.add_argument("--prompt", action="append", default=None, help="a prompt (repeatable; >= 2)")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template")
    p.add_argument("--tolerance", type=float, default=1e-5, help="max allowed |difference|")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..models.loading import format_prompt, load_model
    from ..models.verify import DEFAULT_PROMPTS, verify_parity
    from ..pipeline import RunConfig, _load_kwargs
    from .common import config_from_args

    cfg = config_from_args(RunConfig, args)
    loaded = load_model(cfg.model, **_load_kwargs(cfg))
    prompts = list(args.prompt or DEFAULT_PROMPTS)
    if args.chat:
        prompts = [format_prompt(loaded.tokenizer, p, chat=True) for p in prompts]
    result = verify_parity(loaded, prompts=prompts, tolerance=args.tolerance)
    print(json.dumps(result))
    return 0 if result["passed"] else 1
