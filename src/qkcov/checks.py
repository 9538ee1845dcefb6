"""Checks of user input that run before any heavy work: the records' split pins and the
arguments of the notebook entry point :func:`qkcov.analyze` (one clear line each)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .config import InputError
from .naming import lines_of, where_of
from .tasks.records import ContrastRecord

__all__ = ["check_pins", "check_notebook_inputs", "LOAD_FIELDS"]


def check_pins(recs: Sequence[ContrastRecord]) -> None:
    """``meta.split`` is ``build`` or ``heldout`` on every record, or on none."""
    bad = [
        (i, r) for i, r in enumerate(recs) if r.meta.get("split") not in (None, "build", "heldout")
    ]
    if bad:
        i, r = bad[0]
        raise ValueError(
            f"records ({lines_of([where_of(r, i) for i, r in bad])}): meta.split must be 'build' or "
            f"'heldout', got {r.meta['split']!r}"
        )
    unpinned = [where_of(r, i) for i, r in enumerate(recs) if r.meta.get("split") is None]
    if unpinned and len(unpinned) < len(recs):
        raise ValueError(
            f"records: meta.split pins {len(recs) - len(unpinned)} of {len(recs)} records but not "
            f"{lines_of(unpinned)}; pin every record or none (then --holdout splits them)"
        )


LOAD_FIELDS = ("device", "dtype", "device_map", "trust_remote_code")  # used when qkcov loads


def check_notebook_inputs(
    model: Any, tokenizer: Any, records: Any, config: Any, overrides: Mapping[str, Any]
) -> Any:
    """:func:`analyze`'s arguments: a loaded model and tokenizer, records (or a JSONL path,
    loaded here), no load-time setting it would silently ignore (:class:`InputError`)."""
    from .pipeline.config import RunConfig

    def what(x: Any) -> str:
        return "None" if x is None else f"{type(x).__name__} {x!r}"[:80]

    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise InputError(
            f"analyze(model, ...): expected a loaded transformers model, got {what(model)}; "
            "load one with qkcov.load_model(name) (or run `qkcov run --model NAME`)"
        )
    if tokenizer is None or isinstance(tokenizer, (str, Path)) or not callable(tokenizer):
        raise InputError(
            f"analyze(model, tokenizer, ...): expected the model's tokenizer, got {what(tokenizer)}"
        )
    if isinstance(records, (str, Path)):
        from .tasks.records import load_records

        records = load_records(records)
    if records is None or isinstance(records, (bytes, Mapping)) or not hasattr(records, "__len__"):
        raise InputError(
            f"analyze(..., records): expected a list of ContrastRecord or dicts (or a JSONL "
            f"path), got {what(records)}"
        )
    if config is not None and not isinstance(config, RunConfig):
        raise InputError(f"analyze(config=...): expected a RunConfig, got {what(config)}")
    given = {k: getattr(config, k) for k in LOAD_FIELDS} if config is not None else {}
    given.update({k: v for k, v in overrides.items() if k in LOAD_FIELDS})
    param = next(iter(model.parameters()), None)
    here = {
        "device": None if param is None else param.device,
        "dtype": None if param is None else str(param.dtype).removeprefix("torch."),
    }
    for key, value in given.items():
        if key == "device" and isinstance(value, str) and value.strip().lower() == "auto":
            same = True  # the default: wherever the model already is
        elif key == "device" and isinstance(value, str) and value.strip():
            try:
                same = torch.device(value) == here["device"] or (
                    torch.device(value).index is None
                    and here["device"] is not None
                    and torch.device(value).type == here["device"].type
                )
            except (RuntimeError, ValueError):
                same = False
        elif key == "dtype":
            same = value in ("auto", here["dtype"])
        else:
            same = value == getattr(RunConfig, key, None) or not value
        if not same:
            raise InputError(
                f"analyze(): {key}={value!r} is a setting for loading a model, and analyze() runs "
                f"the model you pass where it is ({here['dtype']} on {here['device']}); move or "
                "cast the model yourself (model.to(...)) instead"
            )
    return records
