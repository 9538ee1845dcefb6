"""Step: rotary specs of the model, rotary-band profiles of a head's subspaces and the
position-only control (offsets per feature: :mod:`qkcov.engine.position`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ...results import FeatureResult
from ...runtime import sub_seed
from ..config import RunConfig


def _rotary(model: Any, n_layers: int, frame: str) -> tuple[dict[int, Any], str | None]:
    """Rotary specs of every layer and why there are none; ``--frame query`` refuses a model
    without a known rotary layout here, before any heavy work."""
    from ...models.rotary import rotary_specs

    try:
        return rotary_specs(model, range(n_layers)), None
    except ValueError as err:
        if frame == "query":
            raise
        return {}, str(err).replace("--frame query: ", "").replace("; use --frame post", "")


def _head_position(
    features: Mapping[str, FeatureResult],
    spec: Any,
    vecs: Any,
    build: Sequence[Any],
    feature_of: list[str],
    cfg: RunConfig,
    name: str,
    no_rotary: str | None = None,
) -> dict[str, Any]:
    """Rotary-band profiles of the head's subspaces and the position-only control."""
    from ...engine.position import position_controls, rotary_profiles

    out: dict[str, Any] = {"frame": cfg.frame}
    if spec is None:
        out["rotary_profile"] = None
        out["rotary_skipped"] = no_rotary or "the model has no rotary layout qkcov knows"
    else:
        out["rotary"] = {"layout": spec.layout, "rotary_dim": spec.rotary_dim,
                         "wavelengths": [float(x) for x in spec.wavelengths()]}  # fmt: skip
        out["rotary_profile"] = rotary_profiles(features, spec)
    if vecs is not None and build:
        out["control"] = position_controls(
            vecs.select(list(range(len(build)))), build, features, feature_of,
            seed=sub_seed(cfg.seed, f"position:{name}"),
        )  # fmt: skip
    else:
        out["control"] = None
        out["control_skipped"] = "needs the projections step (its build-record vectors)"
    return out
