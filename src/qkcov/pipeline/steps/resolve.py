"""Step: records → token positions (exact char spans), prompts checked against the model's
length limit."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..config import RunConfig
from ..plan import Plan


def _resolve_step(model: Any, tokenizer: Any, plan: Plan, cfg: RunConfig) -> Sequence[Any]:
    """Every record resolved to token positions; a prompt over ``--max-tokens`` (default:
    the model's positions) is refused."""
    from ...engine.contrast import check_lengths, resolve_records
    from ...models.loading import max_positions

    resolved = resolve_records(tokenizer, plan.records, chat=cfg.chat)
    limit = cfg.max_tokens or max_positions(model)
    if limit:
        check_lengths(resolved, limit)
    return resolved
