"""Shared helpers for dataclass configs: ``to_dict`` / ``from_dict`` with validation."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

__all__ = ["ConfigMixin", "InputError", "check_range", "check_positive_int"]

T = TypeVar("T", bound="ConfigMixin")


class InputError(ValueError, TypeError):
    """Bad input from a user (a wrong type or value): one line naming it. A ``ValueError``
    (the CLI prints it as one line) and a ``TypeError`` (what a notebook user expects)."""


class ConfigMixin:
    """Mixin for ``@dataclass`` configs: JSON-friendly round trip, unknown keys rejected."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any]) -> T:
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(
                f"{cls.__name__}: unknown field(s) {unknown}; expected some of {sorted(names)}"
            )
        kwargs = {}
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            if f.name in data:
                value = data[f.name]
                # JSON turns tuples into lists; restore the declared container type.
                if isinstance(value, list) and "tuple" in str(f.type):
                    value = tuple(value)
                kwargs[f.name] = value
        return cls(**kwargs)


def check_range(
    name: str, value: float, low: float, high: float, *, low_open: bool = False
) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``low (<|<=) value <= high``."""
    ok = (value > low if low_open else value >= low) and value <= high
    if not ok:
        bracket = "(" if low_open else "["
        raise ValueError(f"{name} must be in {bracket}{low}, {high}], got {value!r}")


def check_positive_int(name: str, value: int, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
