"""One mapping from names in records to safe file and tensor-name components.

Feature, group and swap-condition names come from users' records and must never become
paths (``../x``, ``/abs``, ``a/b``, NUL, very long names) nor make two tensor names equal
(``a.b`` + ``c`` vs ``a`` + ``b.c``). :func:`safe_component` maps a name to a component that
is lowercase ASCII without separators: a plain name (``order``, ``fruit``, ``plural``) is kept
as it is, any other name becomes a slug plus a hash of the exact name (``a.b`` →
``a_b~3f2c…``). The map is injective up to the hash (a hashed component holds ``~``, a kept
one never does) and case-insensitive filesystems cannot merge two components (all are
lowercase). The real names stay in the JSON artifacts.

:func:`check_record_names` refuses, before any model is loaded, names the pipeline uses for
its own results (``pooled``, the swap conditions, ...) naming the records' lines.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from typing import Any

__all__ = [
    "safe_component",
    "tensor_prefix",
    "check_record_names",
    "RESERVED_FEATURES",
    "RESERVED_GROUPS",
]

_PLAIN = re.compile(r"[a-z0-9][a-z0-9_-]{0,47}\Z")
_SLUG_DROP = re.compile(r"[^a-z0-9_-]+")

# swap conditions beside the features' own (engine/swaps.py, pipeline._swap_conditions) and
# the attribution's remainder part
RESERVED_FEATURES = ("all", "null", "ceiling", "residual")
RESERVED_SUFFIXES = ("@energy", ":groups")
RESERVED_GROUPS = ("pooled",)


def safe_component(name: str) -> str:
    """A file- and tensor-name-safe component for ``name`` (see the module doc)."""
    name = str(name)
    if _PLAIN.match(name):
        return name
    slug = _SLUG_DROP.sub("_", name.lower()).strip("_")[:32] or "x"
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return f"{slug}~{digest}"


def tensor_prefix(head: str, *names: str) -> str:
    """``<head>.<feature>.<group>.`` (each record name mapped) for ``run.safetensors``."""
    return ".".join([head, *(safe_component(n) for n in names)]) + "."


def where_of(record: Any, i: int) -> str:
    line = getattr(record, "line", None)
    return f"line {line}" if line else f"records[{i}]"


def lines_of(where: list[str], limit: int = 5) -> str:
    shown = ", ".join(where[:limit])
    return shown + (f" and {len(where) - limit} more" if len(where) > limit else "")


def check_record_names(records: Sequence[Any], default_feature: str = "feature") -> None:
    """``ValueError`` (one line, naming the records' lines) for a feature or group name the
    results cannot hold: a reserved name, two names that map to one component, or a feature
    whose records mix a ``group`` with none."""
    feats: dict[str, list[str]] = {}
    groups: dict[str, dict[str | None, list[str]]] = {}
    for i, r in enumerate(records):
        f = r.feature or default_feature
        feats.setdefault(f, []).append(where_of(r, i))
        groups.setdefault(f, {}).setdefault(r.group, []).append(where_of(r, i))
    for f, where in feats.items():
        if f in RESERVED_FEATURES or f.endswith(RESERVED_SUFFIXES):
            raise ValueError(
                f"records ({lines_of(where)}): feature {f!r} is a name qkcov uses for its own "
                f"results (reserved: {', '.join(RESERVED_FEATURES)} and names ending in "
                f"{' or '.join(RESERVED_SUFFIXES)}); rename the feature"
            )
    _collisions({f: w for f, w in feats.items()}, "feature")
    for f, by_group in groups.items():
        for g, where in by_group.items():
            if g is not None and (g in RESERVED_GROUPS or not g):
                what = "an empty group" if not g else f"group {g!r}"
                raise ValueError(
                    f"records ({lines_of(where)}): {what} cannot be told from the pooled result "
                    f"of all groups (reserved: {', '.join(RESERVED_GROUPS)}, ''); rename it"
                )
        if None in by_group and len(by_group) > 1:
            named = next(w for g, w in by_group.items() if g is not None)
            raise ValueError(
                f"records of feature {f!r}: {len(by_group[None])} have no group "
                f"({lines_of(by_group[None])}) and others have one ({lines_of(named)}); per-group "
                "ΔC needs a group on every record of a feature, or on none"
            )
        _collisions({g: w for g, w in by_group.items() if g is not None}, f"group of {f!r}")


def _collisions(names: dict[str, list[str]], kind: str) -> None:
    seen: dict[str, str] = {}
    for name in names:
        comp = safe_component(name)
        if comp in seen and seen[comp] != name:
            other = seen[comp]
            raise ValueError(
                f"records ({lines_of(names[other] + names[name])}): {kind} names {other!r} and "
                f"{name!r} map to the same file name {comp!r}; rename one"
            )
        seen[comp] = name
