"""Step: the report's per-prompt view of the headline swap (attention before/after, each
key's exact logit split)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ...results import FeatureResult, SwapResult, TokenViewResult
from ..config import Head, RunConfig
from .attribution import _query_bases
from .swaps import _condition_basis, model_head_dim


def _token_view(
    model: Any,
    tokenizer: Any,
    resolved: Sequence[Any],
    swap_base: Callable[[], Any] | None,
    head: Head,
    features: Mapping[str, FeatureResult],
    swaps: SwapResult,
    cfg: RunConfig,
) -> TokenViewResult | None:
    """The report's per-prompt view: the swap records' first prompts (same swap pairs and
    the same unedited forward as :func:`_swaps`), attention before/after the headline swap
    and the exact logit split (in the run's frame)."""
    from ...engine.tokenview import collect_token_view

    if swap_base is None or not resolved:
        return None
    base = swap_base()
    basis = _condition_basis(features, swaps, cfg, int(model_head_dim(model)))
    qb = _query_bases(features)
    info, tensors = collect_token_view(
        model, tokenizer, resolved, base.pairs[head], head[0], head[1], basis, qb,
        condition=swaps.headline, batch_size=cfg.batch_size, batches=base.views[head],
    )  # fmt: skip
    if basis is None:
        info["after_reason"] = swaps.skipped or f"condition {swaps.headline!r} has no key basis"
    return TokenViewResult(info, tensors)
