"""A found subspace as a portable research result: :class:`Subspace`.

One head's query and key subspaces for one feature (and group), in the frame they were
found in (post-RoPE query/key coordinates of that head), with the singular values, the
ranks a run produced (``causal`` where the run measured it, ``null``, ``energy``), the head
and the model it belongs to. ``save``/``load`` use safetensors (tensors, with the JSON
fields in its metadata) plus a readable JSON beside it; no pickle.

>>> sub = result.subspace("L13H8", "number")          # doctest: +SKIP
>>> sub = qkcov.load_subspace("runs/mine", "L13H8", "number")   # doctest: +SKIP
>>> sub.save("number.safetensors"); qkcov.Subspace.load("number.safetensors")  # doctest: +SKIP

Applying it to a model: :mod:`qkcov.models.apply` (plain PyTorch / Hugging Face),
``docs/export.md`` (TransformerLens, nnsight).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

__all__ = ["Subspace", "load_subspace", "FRAME", "FORMAT"]

FRAME = "post-rope"
FRAMES = (FRAME, "query")
FORMAT = "qkcov-subspace/1"
_TENSORS = ("query_directions", "key_directions", "singular_values")
ORTHO_TOL = 1e-4
"""Largest entry of ``|BᵀB − I|`` accepted for a basis ``B`` (float32 bases reach ~1e-6)."""


def _int(value: Any, what: str, lo: int, hi: int | None = None) -> int:
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < lo
        or (hi is not None and value > hi)
    ):
        span = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{what}: expected an integer {span}, got {value!r}")
    return value


@dataclass
class Subspace:
    """Query/key subspace of one head for one feature.

    Attributes:
        query_directions / key_directions: ``[D, K]`` orthonormal columns ordered by singular
            value (the left / right singular vectors of ΔC, ``K = min(D_q, D_k)``);
            ``query_basis`` / ``key_basis`` are their first ``rank`` columns.
        singular_values: ``[K]`` descending.
        rank: the rank in force; ``ranks``: ``{"causal", "null", "energy"}`` as the run
            found them (``None`` where it did not measure one).
        layer, head: the head (``name`` is ``L{layer}H{head}``); ``frame``: ``"post-rope"``, or ``"query"`` for a ``--frame query`` run
            (keys in their query's rotary frame, ``R(p_q)ᵀk``).
        model / revision: the model id (preset, hub id or path) and its revision if known;
            ``model_info``: ``n_layers``, ``n_heads``, ``n_kv_heads``, ``head_dim`` of it.
    """

    layer: int
    head: int
    feature: str
    group: str
    query_directions: torch.Tensor
    key_directions: torch.Tensor
    singular_values: torch.Tensor
    rank: int
    rank_rule: str
    ranks: dict[str, int | None]
    model: str
    revision: str | None = None
    model_info: dict[str, Any] = field(default_factory=dict)
    frame: str = FRAME
    source: dict[str, Any] = field(default_factory=dict)  # run folder, seed, n_build, ...

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, where: str | None = None) -> None:
        """One ``ValueError`` naming the field when the subspace is not usable as it is:
        bases not ``[D, K]`` (``K ≤ D``), not finite, or not orthonormal within
        :data:`ORTHO_TOL`; singular values not ``[K]`` finite ≥ 0; ``rank`` (and ``ranks``)
        outside ``[0, K]``; ``layer``/``head`` negative; an unknown ``frame``."""
        w = f"subspace {where or f'L{self.layer}H{self.head} {self.feature!r}'}"
        _int(self.layer, f"{w}: layer", 0)
        _int(self.head, f"{w}: head", 0)
        if self.frame not in FRAMES:
            raise ValueError(f"{w}: frame: expected one of {', '.join(FRAMES)}, got {self.frame!r}")
        shape = None
        for field_name in ("query_directions", "key_directions"):
            t = getattr(self, field_name)
            if not isinstance(t, torch.Tensor) or t.ndim != 2 or not t.is_floating_point():
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{w}: {field_name}: expected a float [D, K] tensor, got {got}")
            if shape is not None and tuple(t.shape) != shape:
                raise ValueError(
                    f"{w}: {field_name}: shape {tuple(t.shape)} differs from query_directions {shape}"
                )
            shape = tuple(t.shape)
            D, K = shape
            if not 0 < K <= D:
                raise ValueError(f"{w}: {field_name}: expected [D, K] with 0 < K <= D, got {shape}")
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{w}: {field_name}: holds NaN or infinite values")
            t64 = t.detach().double()
            err = float((t64.T @ t64 - torch.eye(K, dtype=torch.float64)).abs().max())
            if not err <= ORTHO_TOL:
                raise ValueError(
                    f"{w}: {field_name}: columns are not orthonormal (max |BᵀB − I| = {err:.3g}, "
                    f"tolerance {ORTHO_TOL})"
                )
        D, K = shape  # type: ignore[misc]
        sv = self.singular_values
        if not isinstance(sv, torch.Tensor) or tuple(sv.shape) != (K,):
            got = tuple(sv.shape) if isinstance(sv, torch.Tensor) else type(sv).__name__
            raise ValueError(f"{w}: singular_values: expected [{K}], got {got}")
        if not bool(torch.isfinite(sv).all()) or bool((sv < 0).any()):
            raise ValueError(f"{w}: singular_values: expected finite values >= 0")
        _int(self.rank, f"{w}: rank", 0, K)
        if not isinstance(self.ranks, dict):
            raise ValueError(f"{w}: ranks: expected a dict, got {type(self.ranks).__name__}")
        for k, v in self.ranks.items():
            if v is not None:
                _int(v, f"{w}: ranks[{k!r}]", 0, K)

    # ------------------------------------------------------------------ views
    @property
    def name(self) -> str:
        return f"L{self.layer}H{self.head}"

    @property
    def head_dim(self) -> int:
        return int(self.key_directions.shape[0])

    @property
    def key_basis(self) -> torch.Tensor:
        """``[D, rank]`` orthonormal key directions."""
        return self.key_directions[:, : self.rank]

    @property
    def query_basis(self) -> torch.Tensor:
        """``[D, rank]`` orthonormal query directions."""
        return self.query_directions[:, : self.rank]

    def at_rank(self, rank: int | str) -> Subspace:
        """The same subspace truncated to ``rank`` (an int, or ``"causal"``/``"null"``/``"energy"``)."""
        if isinstance(rank, str):
            if rank not in self.ranks:
                raise ValueError(
                    f"rank must be an int or one of {sorted(self.ranks)}, got {rank!r}"
                )
            value = self.ranks[rank]
            if value is None:
                raise ValueError(f"{self.name} {self.feature}: the run has no {rank} rank")
            rank_rule, rank = rank, int(value)
        else:
            rank_rule = self.rank_rule if rank == self.rank else "fixed"
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank <= self.head_dim:
            raise ValueError(f"rank must be an integer in [0, {self.head_dim}], got {rank!r}")
        return replace(self, rank=rank, rank_rule=rank_rule)

    def check_model(self, model: Any) -> None:
        """One clear ``ValueError`` when ``model`` (an HF model or a ``model_info`` dict) is
        not shaped like the model the subspace came from (layers, heads, head dimension), or
        when the subspace is not in post-RoPE coordinates (the hooks edit post-RoPE keys).
        The subspace itself is validated again first (it may have been changed in place)."""
        self.validate()
        if self.frame != FRAME:
            raise ValueError(
                f"subspace {self.name} is in the {self.frame!r} frame (a --frame query run): its "
                "directions rotate with the query position, so it cannot be applied to post-RoPE "
                "keys as it is; export it from a --frame post run"
            )
        if isinstance(model, dict):
            info = model
        else:
            import dataclasses

            from .models.loading import model_info

            info = dataclasses.asdict(model_info(model))
        d = int(info.get("head_dim", self.head_dim))
        if d != self.head_dim:
            raise ValueError(
                f"subspace {self.name} {self.feature!r} is [head_dim={self.head_dim}, r] but the "
                f"model's heads have dimension {d} (subspace from {self.model})"
            )
        n_layers = info.get("n_layers")
        want = self.model_info.get("n_layers")
        if want is not None and n_layers is not None and int(n_layers) != int(want):
            raise ValueError(
                f"subspace {self.name} {self.feature!r} comes from a {want}-layer model "
                f"({self.model}); this model has {n_layers} layers"
            )
        if n_layers is not None and self.layer >= int(n_layers):
            raise ValueError(f"subspace layer {self.layer} is past the model's {n_layers} layers")
        n_heads = info.get("n_heads")
        if n_heads is not None and self.head >= int(n_heads):
            raise ValueError(f"subspace head {self.head} is past the model's {n_heads} heads")

    # ------------------------------------------------------------------ notebook
    def __repr__(self) -> str:
        r = ", ".join(f"{k}={v}" for k, v in self.ranks.items() if v is not None)
        return (
            f"Subspace({self.name} {self.feature!r}/{self.group}, rank={self.rank} "
            f"[{self.rank_rule}; {r}], D={self.head_dim}, {self.frame}, model={self.model!r})"
        )

    def _repr_html_(self) -> str:
        from .results import html_table

        rows = [[k, v] for k, v in self.to_json().items() if k not in ("source", "model_info")]
        return html_table(["field", "value"], rows)

    # ------------------------------------------------------------------ files
    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "head": self.name,
            "layer": self.layer,
            "head_index": self.head,
            "feature": self.feature,
            "group": self.group,
            "rank": self.rank,
            "rank_rule": self.rank_rule,
            "ranks": self.ranks,
            "frame": self.frame,
            "model": self.model,
            "revision": self.revision,
            "model_info": self.model_info,
            "head_dim": self.head_dim,
            "singular_values": self.singular_values[:16].tolist(),
            "source": self.source,
        }

    def save(self, path: str | Path, *, force: bool = False) -> Path:
        """``path`` (safetensors; the JSON fields in its metadata) and ``path`` with suffix
        ``.json`` beside it (sealed, holding the safetensors file's sha256). Refuses to
        overwrite a file qkcov did not write, or one it wrote that was changed since, unless
        ``force``."""
        import hashlib

        from .artifacts import atomic_write_bytes, check_replaceable, seal_json, to_jsonable

        path = Path(path)
        sidecar = path.with_suffix(".json")
        if sidecar == path:
            raise ValueError(f"{path}: the subspace file needs a suffix such as .safetensors")
        check_replaceable(sidecar, force=force)
        if not force and os.path.lexists(path) and not _is_ours(path):
            raise ValueError(
                f"--out {path}: exists and is not a qkcov subspace file qkcov wrote (or was "
                "changed since); not overwriting it: pick another path, or add --force"
            )
        self.validate(str(path))
        meta = self.to_json()
        tensors = {k: getattr(self, k).double().contiguous() for k in _TENSORS}
        from safetensors.torch import save as save_bytes

        data = save_bytes(tensors, metadata={"qkcov_subspace": json.dumps(to_jsonable(meta))})
        atomic_write_bytes(path, data)
        side = seal_json({**meta, "file_sha256": hashlib.sha256(data).hexdigest()})
        text = json.dumps(to_jsonable(side), indent=1, ensure_ascii=False) + "\n"
        atomic_write_bytes(sidecar, text.encode())
        return path

    @classmethod
    def load(cls, path: str | Path) -> Subspace:
        """Read a file written by :meth:`save` (only its safetensors file is needed); every
        problem, a bad tensor or field included, is one ``ValueError`` naming the file."""
        from .artifacts import artifact_errors, load_tensors, read_tensor_metadata

        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"subspace file not found: {path}")
        try:
            meta = read_tensor_metadata(path).get("qkcov_subspace")
        except ValueError:  # not a safetensors file
            meta = None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ValueError(f"{path}: not a qkcov subspace file (qkcov export writes them)")
        t = load_tensors(path)
        with artifact_errors(path, "qkcov subspace file"):
            for k in _TENSORS:
                if k not in t:
                    raise ValueError(f"{path}: not a valid qkcov subspace file (no tensor {k!r})")
            try:
                return cls(
                    layer=meta["layer"],
                    head=meta["head_index"],
                    feature=str(meta["feature"]),
                    group=str(meta["group"]),
                    query_directions=t["query_directions"],
                    key_directions=t["key_directions"],
                    singular_values=t["singular_values"],
                    rank=meta["rank"],
                    rank_rule=str(meta["rank_rule"]),
                    ranks=dict(meta["ranks"]),
                    model=str(meta["model"]),
                    revision=meta.get("revision"),
                    model_info=dict(meta.get("model_info") or {}),
                    frame=meta.get("frame", FRAME),
                    source=dict(meta.get("source") or {}),
                )
            except ValueError as err:
                raise ValueError(f"{path}: {err}") from None


def _is_ours(path: Path) -> bool:
    """Whether ``path`` is a subspace file qkcov wrote and nobody changed: its sealed
    sidecar holds the file's sha256."""
    import hashlib

    from .artifacts import is_sealed, read_regular_bytes

    sidecar = path.with_suffix(".json")
    try:
        if not is_sealed(sidecar) or path.is_symlink():
            return False
        want = json.loads(sidecar.read_text(encoding="utf-8")).get("file_sha256")
        data = read_regular_bytes(path, cap=1 << 30, what="subspace file")
        return hashlib.sha256(data).hexdigest() == want
    except (OSError, ValueError):
        return False


def _causal_rank(causal: Any, feature: str) -> int | None:
    """``causal_rank.rank`` of a head when the run measured it for ``feature``."""
    if causal is None:
        return None
    get = causal.get if isinstance(causal, dict) else lambda k, d=None: getattr(causal, k, d)
    if get("feature") not in (None, feature):
        return None
    rank = get("rank")
    return None if rank is None else int(rank)


def subspace_from_result(
    result: Any, head: str, feature: str, group: str = "pooled", causal: Any = None
) -> Subspace:
    """:class:`Subspace` of ``head``/``feature``/``group`` in an :class:`AnalysisResult`;
    one line listing what the run has when one of them is not in it."""
    from .core.subspace import feature_subspace

    names = [h.name for h in result.heads]
    if head not in names:
        raise ValueError(f"head {head!r} is not in the run; it has {', '.join(names) or 'none'}")
    hr = result.head(head)
    if feature not in hr.features:
        raise ValueError(f"feature {feature!r} is not in the run; it has {', '.join(hr.features)}")
    fr = hr.features[feature]
    if group not in fr.groups:
        raise ValueError(
            f"group {group!r} of feature {feature!r} is not in the run; it has "
            f"{', '.join(fr.groups)}"
        )
    s = fr.groups[group]
    full = feature_subspace(s.delta, rank=min(s.delta.shape))
    sig = s.significance or {}
    rank_null = sig.get("rank_null") if sig.get("available") else None
    if causal is None:
        causal = getattr(hr.swaps, "causal_rank", None)
    # the head's headline rank when this is its headline subspace (the pooled ΔC of the
    # headline feature, truncated by the causal rank), else the rank of the rule in force
    rank, rank_rule = int(s.rank), s.rank_rule
    hl = hr.headline_rank
    if group == "pooled" and feature == hl.feature and hl.basis == "pooled" and hl.condition:
        rank, rank_rule = int(hl.rank), hl.rule
    mi = dict(result.model_info or {})
    cfg = result.config or {}
    prov = getattr(result, "provenance", None) or (cfg.get("provenance") if cfg else None) or {}
    return Subspace(
        layer=hr.layer,
        head=hr.head,
        feature=feature,
        group=group,
        query_directions=full.query_basis.double(),
        key_directions=full.key_basis.double(),
        singular_values=full.singular_values.double(),
        rank=rank,
        rank_rule=rank_rule,
        ranks={
            "causal": _causal_rank(causal, feature),
            "null": None if rank_null is None else int(rank_null),
            "energy": int(s.rank_energy),
        },
        model=result.model,
        frame="query" if cfg.get("frame") == "query" else FRAME,
        revision=cfg.get("revision") or prov.get("revision"),
        model_info={k: mi[k] for k in ("architecture", "n_layers", "n_heads", "n_kv_heads", "head_dim") if k in mi},
        source={"seed": cfg.get("seed"), "n_pos": s.n_pos, "n_neg": s.n_neg},
    )  # fmt: skip


def load_subspace(
    run_dir: str | Path, head: str, feature: str | None = None, group: str = "pooled"
) -> Subspace:
    """:class:`Subspace` of ``head`` / ``feature`` (default: the run's first feature) from a
    saved run folder (checked against its manifest)."""
    from .artifacts import artifact_errors, read_json
    from .results import RUN_JSON, AnalysisResult

    where = Path(run_dir) / RUN_JSON
    with artifact_errors(where, "run folder"):
        result = AnalysisResult.load(run_dir)
        data = read_json(where, expect=dict)
        if feature is None:
            feature = result.features[0]["name"] if result.features else "feature"
        causal = next((h.get("causal_rank") for h in data["heads"] if h.get("name") == head), None)
        try:
            sub = subspace_from_result(result, head, feature, group, causal=causal)
        except ValueError as err:
            if "is not in the run" in str(err):
                raise
            raise ValueError(f"{where}: {err}") from None
    sub.source["run"] = str(Path(run_dir))
    return sub
