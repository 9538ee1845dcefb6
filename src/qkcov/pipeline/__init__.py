"""The one orchestrator: contrast records → the whole method, for any contrast.

:func:`analyze` (notebook) and :func:`run` (``qkcov run`` and the built-in tasks) go through
the same steps:

1. **plan** (no model): group records by ``feature`` (one ΔC family each, e.g. order-ID and
   lexical), split them into build / held-out records (``meta["split"]`` when every record
   pins it, else a seeded ``holdout`` fraction per feature) and check that ΔC is computable;
2. **scan** every head on build records that hold both a positive and a negative key and pick
   heads (``auto``, ``auto:K`` or ``L20H26,...``);
3. **ΔC** per feature, group and pooled on build records; subspaces by the rank rule; unions
   of group subspaces and their principal angles;
4. **projections** of held-out keys/queries on each feature's top-3 directions and
   nearest-centroid group accuracy against random 3-D subspaces and PCA;
5. **swaps** of held-out records' most-attended positive key with a negative key inside each
   feature's key subspace, in the forward pass, against equal-rank random subspaces and the
   full-key ceiling;
6. **attribution** of held-out logits over the features' query subspaces (exact);
   beside them, **position** (:mod:`qkcov.engine.position`): query–key offsets of the build
   keys (a note names a confounded feature), rotary-band profiles of every subspace and the
   position-only control; ``frame="query"`` runs steps 3–6 in each query's rotary frame;
7. typed results (:mod:`qkcov.results`), artifacts, figures and a report section.

One room per step: :mod:`.config` (settings, provenance), :mod:`.plan` (split, record
subsets), :mod:`.state` (checkpoints, resume), :mod:`.steps` (one module per step),
:mod:`.verdict`, and :mod:`.run` (:func:`analyze` / :func:`run`, the list of steps). Every
name the single-file ``qkcov/pipeline.py`` held stays importable from here.
"""

# ruff: noqa: F401  (re-exports: every old name of qkcov/pipeline.py stays importable)
from .config import (
    ATTRIBUTION_RANDOM,
    CAUSAL_FRACTION,
    CAUSAL_MAX,
    CURVE_RANDOM,
    DEFAULT_FEATURE,
    DTYPES,
    FRAMES,
    PROJ_DIMS,
    RANK_RULES,
    STEPS,
    Head,
    RunConfig,
    _help,
    _load_kwargs,
    auto_device,
    provenance,
)
from .plan import Plan, _as_records, _subset, plan_records, record_subsets

# ``run`` names both the function and the submodule ``qkcov.pipeline.run``: loading the
# submodule sets the package attribute to the module, then this import rebinds the function
# (the submodule stays in sys.modules, so no later import sets it back)
from .run import _analyze, analyze, run
from .state import RunState
from .steps.attribution import _attribution, _query_bases
from .steps.causal import _Causal, _causal_plan, _finite, _quiet_ci
from .steps.collect import _collect_step
from .steps.contrast import (
    NULL_TOP,
    OBS_TOP,
    _contrast_step,
    _duplicate_notes,
    _groups_max_t,
    _significance,
    _subspace_results,
)
from .steps.head import _head_step
from .steps.position import _head_position, _rotary
from .steps.projections import _name_points, _projection
from .steps.scan import _explicit_heads, _scan_step
from .steps.swaps import (
    _condition_basis,
    _permuted_baselines,
    _scored_token,
    _swap_conditions,
    _swap_statistics,
    _swaps,
    model_head_dim,
)
from .steps.token_view import _token_view
from .verdict import _verdict

__all__ = ["RunConfig", "Plan", "plan_records", "analyze", "run", "DEFAULT_FEATURE", "DTYPES"]
