"""Step: the model and tokenizer ``qkcov run`` loads (``analyze`` gets them loaded)."""

from __future__ import annotations

from typing import Any

from ...runtime import Timer
from ..config import RunConfig, _load_kwargs


def _load_step(cfg: RunConfig, dist: Any, timer: Timer) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of ``--model`` on the run's device and dtype."""
    from ...models.loading import load_model

    with timer.phase("load"):
        timer.log(f"loading {cfg.model}")
        lm = load_model(cfg.model, **_load_kwargs(cfg, dist))
        return lm.model, lm.tokenizer
