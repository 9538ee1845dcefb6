"""Head specs like ``"L20H26,L16H19"`` and layer/head range validation."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

__all__ = ["parse_heads", "format_head", "check_layers", "check_heads"]

_SPEC = re.compile(r"^\s*L(\d+)\s*H(\d+)\s*$", re.IGNORECASE)


def format_head(layer: int, head: int) -> str:
    """``(20, 26) -> "L20H26"``."""
    return f"L{layer}H{head}"


def parse_heads(spec: str | Sequence[str], n_layers: int, n_heads: int) -> list[tuple[int, int]]:
    """Parse ``"L20H26,L16H19"`` (or a list of such items) into ``[(20, 26), (16, 19)]``.

    Order is kept, duplicates dropped. Raises ``ValueError`` naming the bad item and the
    valid ranges ``L0..L{n_layers-1}``, ``H0..H{n_heads-1}``.
    """
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    items = [s.strip() for s in items if s.strip()]
    if not items:
        raise ValueError(f"empty head spec {spec!r}; expected e.g. 'L20H26,L16H19'")
    out: list[tuple[int, int]] = []
    for item in items:
        m = _SPEC.match(item)
        if m is None:
            raise ValueError(
                f"bad head spec {item!r}: expected 'L<layer>H<head>' such as 'L20H26', "
                f"with layer in [0, {n_layers - 1}] and head in [0, {n_heads - 1}]"
            )
        layer, head = int(m.group(1)), int(m.group(2))
        if layer >= n_layers or head >= n_heads:
            raise ValueError(
                f"head spec {item!r} is out of range: layer must be in [0, {n_layers - 1}] "
                f"and head in [0, {n_heads - 1}]"
            )
        if (layer, head) not in out:
            out.append((layer, head))
    return out


def check_layers(layers: int | Iterable[int], n_layers: int) -> list[int]:
    """Validate layer indices (negative counts from the end); returns sorted unique list."""
    raw = [layers] if isinstance(layers, int) else list(layers)
    if not raw:
        raise ValueError(f"no layers requested; valid layers are [0, {n_layers - 1}]")
    out = set()
    for layer in raw:
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise ValueError(
                f"layer {layer!r} is not an integer; valid layers are [0, {n_layers - 1}]"
            )
        if not -n_layers <= layer < n_layers:
            raise ValueError(f"layer {layer} out of range; valid layers are [0, {n_layers - 1}]")
        out.add(layer % n_layers)
    return sorted(out)


def check_heads(heads: int | Iterable[int] | None, n_heads: int) -> list[int]:
    """Validate head indices (``None`` = all heads); keeps the given order, drops duplicates."""
    if heads is None:
        return list(range(n_heads))
    raw = [heads] if isinstance(heads, int) else list(heads)
    if not raw:
        raise ValueError(f"no heads requested; valid heads are [0, {n_heads - 1}]")
    out: list[int] = []
    for head in raw:
        if isinstance(head, bool) or not isinstance(head, int):
            raise ValueError(f"head {head!r} is not an integer; valid heads are [0, {n_heads - 1}]")
        if not 0 <= head < n_heads:
            raise ValueError(f"head {head} out of range; valid heads are [0, {n_heads - 1}]")
        if head not in out:
            out.append(head)
    return out
