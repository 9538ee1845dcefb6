"""One model identity, however the model was loaded (``qkcov run --model``, ``load_model`` in a
notebook, or ``transformers`` directly).

:func:`model_identity` returns ``{"name", "revision", "fingerprint", "config_sha256",
"shapes_sha256", "weights_sha256", "weights_from"}``:

- ``name``: the canonical name: a preset's name (also when the model was loaded from the
  preset's files by path), else the hub id or path it was loaded from, else the class name;
- ``revision``: the hub commit when transformers knows it;
- ``config_sha256``: the model's (text) config without what describes the load rather than
  the model (``_name_or_path``, dtype, attention implementation, versions);
- ``shapes_sha256``: every parameter's name and shape;
- ``weights_sha256``: the weight files' sizes and sampled bytes (``weights_from="files"``:
  independent of the dtype the weights were loaded in), else the hub revision
  (``"revision"``), else the parameters' float32 bytes (``"parameters"``: a model built in
  memory);
- ``fingerprint``: the first 16 hex digits of the hash of the three: two runs share it
  exactly when they ran the same weights of the same architecture.

The loader records where a model came from (:func:`remember`); a model it did not load is
identified from its config.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import weakref
from pathlib import Path
from typing import Any

from .loading import SOURCE_ATTR

__all__ = ["model_identity", "canonical_name", "remember", "same_model"]

_SOURCES: weakref.WeakKeyDictionary[Any, dict[str, Any]] = weakref.WeakKeyDictionary()
_VOLATILE = {
    "_name_or_path", "_model_name_or_path", "_commit_hash", "dtype", "torch_dtype",
    "_attn_implementation", "_attn_implementation_internal", "attn_implementation",
    "transformers_version", "use_cache", "output_attentions", "output_hidden_states",
    "return_dict", "_attn_implementation_autoset", "_experts_implementation",
}  # fmt: skip
_WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".pth")
_CHUNK = 1 << 16


def remember(model: Any, name: str, location: str, gguf_file: str | None) -> None:
    """Record where :func:`qkcov.models.loading.load_model` loaded ``model`` from."""
    _SOURCES[model] = {"name": name, "location": location, "gguf_file": gguf_file}


@functools.lru_cache(maxsize=8)
def _preset_files() -> dict[str, Path]:
    """Preset name -> its weights file, for the presets installed here."""
    from .loading import PRESETS  # identity sits above loading (loading never imports it)

    out = {}
    for name, preset in PRESETS.items():
        try:
            directory, gguf = preset.locate()
        except Exception:  # noqa: BLE001 - a preset not installed is simply not one of these
            continue
        out[name] = (Path(directory) / gguf).resolve()
    return out


def canonical_name(name_or_path: str | None) -> str:
    """A preset's name for the preset itself or its files (its folder or GGUF file), else
    the name as given (hub id or path)."""
    text = (name_or_path or "").strip()
    if not text:
        return ""
    files = _preset_files()
    if text.lower() in files:
        return text.lower()
    try:
        path = Path(text).expanduser().resolve()
    except (OSError, RuntimeError):
        return text
    for name, file in files.items():
        if path == file or path == file.parent:
            return name
    return text


def _sha(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def _config_dict(model: Any) -> dict[str, Any]:
    cfg = getattr(model, "config", None)
    if cfg is None:
        return {}
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    d = text.to_dict() if hasattr(text, "to_dict") else dict(vars(text))

    def clean(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items() if k not in _VOLATILE}
        return x

    return clean(d)


def _sampled_file_hash(files: list[Path]) -> str:
    """sha256 over each file's name, size and 16 evenly spaced 64 KiB chunks (first and last
    included): cheap for any model size, different for any other checkpoint."""
    h = hashlib.sha256()
    for f in sorted(files, key=lambda p: p.name):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            n = 16
            for i in range(n):
                fh.seek(max(0, (size - _CHUNK) * i // (n - 1)))
                h.update(fh.read(_CHUNK))
    return h.hexdigest()


def _weight_files(source: dict[str, Any] | None, name: str, model: Any) -> list[Path]:
    if source is not None:
        location, gguf = Path(source["location"]), source.get("gguf_file")
        if gguf:
            return [location / gguf] if (location / gguf).is_file() else []
        if location.is_dir():
            return [p for p in location.iterdir() if p.suffix in _WEIGHT_SUFFIXES and p.is_file()]
        return []
    files = _preset_files()
    if name in files:
        return [files[name]]
    where = Path(str(getattr(getattr(model, "config", None), "_name_or_path", "") or ""))
    if where.is_dir() and str(where) not in ("", "."):
        found = [p for p in where.iterdir() if p.suffix in _WEIGHT_SUFFIXES and p.is_file()]
        if len([p for p in found if p.suffix == ".gguf"]) <= 1:
            return found
    return []


def _parameter_hash(model: Any) -> str:
    import torch

    h = hashlib.sha256()
    for pname, p in model.named_parameters():
        h.update(pname.encode())
        if p.device.type == "meta":
            continue
        h.update(p.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


_CACHE: weakref.WeakKeyDictionary[Any, dict[str, Any]] = weakref.WeakKeyDictionary()


def model_identity(model: Any) -> dict[str, Any]:
    """The canonical identity of a loaded model (see the module docstring); computed once
    per model object."""
    try:
        cached = _CACHE.get(model)
    except TypeError:
        cached = None
    if cached is not None:
        return dict(cached)
    source = _SOURCES.get(model) or getattr(model, "__dict__", {}).get(SOURCE_ATTR)
    cfg = getattr(model, "config", None)
    raw = source["name"] if source else getattr(cfg, "_name_or_path", "") or ""
    name = canonical_name(raw) or type(model).__name__
    revision = getattr(cfg, "_commit_hash", None)
    config_sha = _sha(_config_dict(model))
    shapes_sha = _sha([[n, list(p.shape)] for n, p in model.named_parameters()])
    files = _weight_files(source, name, model)
    if files:
        weights_sha, weights_from = _sampled_file_hash(files), "files"
    elif revision:
        weights_sha, weights_from = _sha(["revision", raw, revision]), "revision"
    else:
        weights_sha, weights_from = _parameter_hash(model), "parameters"
    out = {
        "name": name,
        "revision": revision,
        "fingerprint": _sha([config_sha, shapes_sha, weights_sha])[:16],
        "config_sha256": config_sha,
        "shapes_sha256": shapes_sha,
        "weights_sha256": weights_sha,
        "weights_from": weights_from,
    }
    with contextlib.suppress(TypeError):  # an object that takes no weak reference
        _CACHE[model] = out
    return dict(out)


def same_model(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool | None:
    """Whether two identities are the same model (``None`` when either lacks a
    fingerprint: a run written before identities were recorded)."""
    if not a or not b or not a.get("fingerprint") or not b.get("fingerprint"):
        return None
    return a["fingerprint"] == b["fingerprint"]
