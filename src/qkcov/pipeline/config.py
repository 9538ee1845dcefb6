"""Settings of a run: :class:`RunConfig` (every ``qkcov run`` flag), its constants, the
device rule and :func:`provenance`. It imports nothing of the pipeline above it, so
:mod:`qkcov.checks` can import it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigMixin, check_positive_int, check_range

DEFAULT_FEATURE = "feature"
DTYPES = ("auto", "float32", "bfloat16", "float16", "float64")
RANK_RULES = ("null", "energy")
STEPS = ("projections", "swaps", "attribution")
FRAMES = ("post", "query")
ATTRIBUTION_RANDOM = 20  # random subspace pairs for the explained-fraction baseline
PROJ_DIMS = 3
CAUSAL_MAX = 32  # largest rank of the causal rank curve
CAUSAL_FRACTION = 0.9  # causal rank: smallest r reaching this fraction of the curve's best
CURVE_RANDOM = 20  # random draws per rank of the causal rank curve
Head = tuple[int, int]


def _help(text: str, **kw: Any) -> Any:
    """A dataclass field carrying its CLI help (flags are derived from the fields)."""
    return field(metadata={"help": text}, **kw)


@dataclass
class RunConfig(ConfigMixin):
    """Settings of one pipeline run; every ``qkcov run`` flag is one of these fields."""

    model: str = _help("preset, Hugging Face id, local path or .gguf", default="smollm2-135m")
    device: str = _help(
        "torch device of the forward pass (auto = cuda when available, else cpu; cpu, cuda:1)",
        default="auto",
    )
    dtype: str = _help(
        f"forward dtype, one of {', '.join(DTYPES)}; ΔC accumulates in float64", default="auto"
    )
    device_map: str | None = _help(
        "accelerate device map (e.g. auto) for models bigger than one device", default=None
    )
    heads: str = _help(
        "'auto' (top --n-heads of the head scan), 'auto:K' or L20H26,L16H19", default="auto"
    )
    n_heads: int = _help("heads kept by 'auto'", default=3)
    batch_size: int = _help("prompts per forward pass", default=8)
    seed: int = _help("seed of the split, swap targets, random subspaces and resampling", default=0)
    holdout: float = _help(
        "fraction of records held out for projections, swaps and attribution", default=0.3
    )
    chat: bool = _help("format prompts with the tokenizer's chat template", default=False)
    energy: float = _help("cumulative singular-value energy of the energy rank rule", default=0.99)
    rank_rule: str = _help(
        "rank in force: 'null' (above the permutation null) or 'energy'", default="null"
    )
    alpha: float = _help("significance level of the null rank and p-values", default=0.05)
    n_permutations: int = _help("permutations of the ΔC null (0 = off)", default=200)
    n_bootstrap: int = _help("bootstrap resamples of records (0 = off)", default=200)
    n_random: int = _help(
        "random equal-rank subspaces per swap condition (attention metrics, computed offline)",
        default=100,
    )
    n_random_downstream: int = _help(
        "random draws per condition that also get a downstream (log-prob) pass", default=3
    )
    n_swap: int = _help("held-out records used for swaps (0 = all)", default=64)
    n_permuted: int = _help(
        "label-permuted subspaces per swap condition and label-permuted centroids of the "
        "label-sensitive centroid patch (the permutation null's relabelling; 0 = off)",
        default=20,
    )
    causal_max_rank: int = _help(
        "largest rank R of the causal rank curve Δp(1..R) (raised to the null rank, at most "
        f"{CAUSAL_MAX}, clamped to the head dimension; 0 = no curve)",
        default=16,
    )
    n_scan: int = _help(
        "build records used for the head scan (0 = all; the scan reports bootstrap CIs)",
        default=128,
    )
    n_attribution: int = _help("held-out records used for attribution (0 = all)", default=64)
    n_centroid: int = _help(
        "build records whose keys fit the group centroids (0 = all)", default=96
    )
    steps: str = _help(
        "steps after ΔC, comma-separated subset of projections,swaps,attribution ('' = ΔC only)",
        default="projections,swaps,attribution",
    )
    checkpoint_every: int = _help(
        "save long phases every N batches to a checkpoint beside --out (0 = off; see --resume)",
        default=0,
    )
    max_tokens: int | None = _help(
        "longest prompt allowed (default: the model's positions)", default=None
    )
    trust_remote_code: bool = _help(
        "allow model code from the checkpoint (off by default)", default=False
    )
    frame: str = _help(
        "q/k frame of ΔC, swaps and attribution: 'post' (post-RoPE) or 'query' (each key in "
        "its query's rotary frame; logits unchanged)",
        default="post",
    )

    def __post_init__(self) -> None:
        from ..engine.scan import check_heads_spec

        if not isinstance(self.model, str) or not self.model.strip():
            raise ValueError(f"--model must be a non-empty name or path, got {self.model!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if not isinstance(self.device, str) or not self.device.strip():
            raise ValueError(
                f"--device must be a torch device such as cpu or cuda, got {self.device!r}"
            )
        try:
            torch.device(auto_device(self.device))
        except (RuntimeError, ValueError):
            raise ValueError(
                f"--device {self.device!r} is not a torch device (cpu, cuda, cuda:1)"
            ) from None
        check_heads_spec(self.heads)
        for name in ("n_heads", "batch_size"):
            check_positive_int(f"--{name.replace('_', '-')}", getattr(self, name), 1)
        for name in (
            "n_permutations",
            "n_bootstrap",
            "n_swap",
            "n_scan",
            "n_attribution",
            "n_centroid",
            "checkpoint_every",
            "n_permuted",
        ):
            check_positive_int(f"--{name.replace('_', '-')}", getattr(self, name), 0)
        check_positive_int("--causal-max-rank", self.causal_max_rank, 0)
        if self.causal_max_rank > CAUSAL_MAX:
            raise ValueError(
                f"--causal-max-rank must be at most {CAUSAL_MAX}, got {self.causal_max_rank}"
            )
        check_positive_int("--n-random", self.n_random, 10)
        check_positive_int("--n-random-downstream", self.n_random_downstream, 1)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"--seed must be an integer, got {self.seed!r}")
        for name, lo, hi, lo_open in (
            ("holdout", 0.0, 1.0, True),
            ("energy", 0.0, 1.0, True),
            ("alpha", 0.0, 1.0, True),
        ):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
                raise ValueError(f"--{name} must be a number, got {v!r}")
            check_range(f"--{name}", float(v), lo, hi, low_open=lo_open)
        if self.holdout >= 1.0:
            raise ValueError(f"--holdout must be in (0, 1), got {self.holdout!r}")
        if self.rank_rule not in RANK_RULES:
            raise ValueError(
                f"--rank-rule must be one of {', '.join(RANK_RULES)}, got {self.rank_rule!r}"
            )
        if self.max_tokens is not None:
            check_positive_int("--max-tokens", self.max_tokens, 1)
        if self.frame not in FRAMES:
            raise ValueError(f"--frame must be one of {', '.join(FRAMES)}, got {self.frame!r}")
        unknown = set(self.step_list()) - set(STEPS)
        if not isinstance(self.steps, str) or unknown:
            raise ValueError(f"--steps must name some of {','.join(STEPS)}, got {self.steps!r}")

    def step_list(self) -> list[str]:
        return [s.strip() for s in str(self.steps).split(",") if s.strip()]


def auto_device(device: str) -> str:
    """``--device auto`` → ``cuda`` when CUDA is available, else ``cpu``; others unchanged."""
    if isinstance(device, str) and device.strip().lower() == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def provenance(
    model: Any, plan: Any, records_path: str | Path | None, command_line: str | None
) -> dict[str, Any]:
    """What reproduces a run: dtype and device actually used, the records file (path,
    sha256, the JSONL line of every build / held-out record), versions, the command line.
    ``plan``: the run's :class:`~qkcov.pipeline.plan.Plan` or ``None`` (not imported here:
    the plan imports this module)."""
    import hashlib
    import platform
    import sys

    import transformers

    from .. import __version__

    param = next(iter(model.parameters()), None)
    out: dict[str, Any] = {
        "dtype": None if param is None else str(param.dtype).removeprefix("torch."),
        "device": None if param is None else str(param.device),
        "device_map": getattr(model, "hf_device_map", None),
        "versions": {"qkcov": __version__, "torch": torch.__version__,
                     "transformers": transformers.__version__, "python": platform.python_version()},
        "command_line": command_line if command_line is not None else " ".join(sys.argv),
        "revision": getattr(getattr(model, "config", None), "_commit_hash", None),
        "records": None,
    }  # fmt: skip
    if records_path is not None and plan is not None:
        path = Path(records_path)
        data = path.read_bytes()
        text = data.decode("utf-8-sig")
        # the records are the non-blank lines in order (tasks.records.parse_records)
        lines = [n for n, line in enumerate(text.split("\n"), start=1) if line.strip()]
        if len(lines) == len(plan.records):
            split = {
                k: [lines[i] for i in range(len(lines)) if plan.split[i] == k]
                for k in ("build", "heldout")
            }
        else:
            split = {"build": None, "heldout": None}
        out["records"] = {
            "path": str(path.expanduser().absolute()),
            "sha256": hashlib.sha256(data).hexdigest(),
            "n_lines": len(lines),
            "build_lines": split["build"],
            "heldout_lines": split["heldout"],
        }
    elif plan is not None:
        out["records"] = {
            "path": None,
            "build_index": [i for i, s in enumerate(plan.split) if s == "build"],
            "heldout_index": [i for i, s in enumerate(plan.split) if s == "heldout"],
        }
    return out


def _load_kwargs(cfg: RunConfig, dist: Any = None) -> dict[str, Any]:
    kw: dict[str, Any] = {}
    if dist is not None and dist.enabled:
        kw["device"] = str(dist.device)
    elif auto_device(cfg.device) != "cpu" and not cfg.device_map:
        kw["device"] = auto_device(cfg.device)
    if cfg.dtype != "auto":
        kw["dtype"] = cfg.dtype
    if cfg.device_map:
        kw["device_map"] = cfg.device_map
    if cfg.trust_remote_code:
        kw["trust_remote_code"] = True
    return kw
