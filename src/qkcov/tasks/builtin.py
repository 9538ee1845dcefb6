"""The built-in tasks as contrast records: one registry that ``qkcov filter`` /
``qkcov binding`` / ``qkcov agreement`` and ``qkcov tasks export`` share.

A task is a config dataclass and a builder returning records whose ``meta["split"]`` pins
the build / held-out split, so ``qkcov tasks export NAME --out f.jsonl`` followed by
``qkcov run --data f.jsonl`` analyses exactly the records ``qkcov NAME`` analyses.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..config import ConfigMixin, check_positive_int
from .agreement import AgreementTaskConfig, build_agreement_records
from .binding import MAX_PAIRS, MIN_PAIRS, BindingTaskConfig, build_binding_records
from .filter import FilterTaskConfig, build_filter_records
from .records import ContrastRecord

__all__ = ["TaskSpec", "TASKS", "BindingFeaturesConfig", "build_task_records", "task_config"]

# Fields the pipeline's common flags own (the task gets them from --seed / --chat).
SHARED_FIELDS = ("seed", "chat")


@dataclass
class BindingFeaturesConfig(ConfigMixin):
    """Both binding features: order-ID (answer letter vs the other letters, one record per
    prompt) and lexical (the same letter when the queried object is bound to it vs absent:
    factual / counterfactual one-sided records). ``n_build`` / ``n_heldout`` per feature."""

    n_pairs: int = field(
        default=3, metadata={"help": f"(object, box) pairs per prompt, {MIN_PAIRS}..{MAX_PAIRS}"}
    )
    n_build: int = field(default=160, metadata={"help": "build records per feature"})
    n_heldout: int = field(default=48, metadata={"help": "held-out records per feature"})
    objects: tuple[str, ...] | None = field(
        default=None, metadata={"help": "object nouns (default: built-in list)"}
    )
    letters: tuple[str, ...] | None = field(
        default=None, metadata={"help": "box letters (default: built-in list)"}
    )
    seed: int = 0
    chat: bool = False

    def __post_init__(self) -> None:
        check_positive_int("--n-build", self.n_build, 2)
        check_positive_int("--n-heldout", self.n_heldout, 2)
        for design in ("order", "lexical"):
            self.design_config(design)  # validates pairs / objects / letters early

    def design_config(self, design: str) -> BindingTaskConfig:
        lexical = design == "lexical"
        even = lambda n: n + n % 2  # noqa: E731  (factual + counterfactual pairs)
        return BindingTaskConfig(
            n_pairs=self.n_pairs,
            design=design,
            chat=self.chat,
            seed=self.seed + (1 if lexical else 0),
            n_build=even(self.n_build) if lexical else max(self.n_build, self.n_pairs),
            n_heldout=even(self.n_heldout) if lexical else max(self.n_heldout, self.n_pairs),
            objects=None if self.objects is None else tuple(self.objects),
            letters=None if self.letters is None else tuple(self.letters),
        )


def _filter(cfg: FilterTaskConfig) -> list[ContrastRecord]:
    build, held = build_filter_records(cfg)
    return [*build, *held]


def _binding(cfg: BindingFeaturesConfig) -> list[ContrastRecord]:
    out: list[ContrastRecord] = []
    for design in ("order", "lexical"):
        build, held = build_binding_records(cfg.design_config(design))
        out += [dataclasses.replace(r, feature=design) for r in [*build, *held]]
    return out


def _agreement(cfg: AgreementTaskConfig) -> list[ContrastRecord]:
    return build_agreement_records(cfg)


@dataclass(frozen=True)
class TaskSpec:
    """A built-in task: its config, record builder and report section."""

    name: str
    config: type
    build: Callable[[Any], list[ContrastRecord]]
    help: str
    title: str
    order: int
    text: tuple[str, ...] = ()
    skip_fields: tuple[str, ...] = ()


TASKS: dict[str, TaskSpec] = {
    "filter": TaskSpec(
        "filter", FilterTaskConfig, _filter,
        "filter heads: which listed items a question's category selects (paper Figs. 6-7)",
        "Filter heads: categorical semantic features (Figs. 6–7)", 20,
        ("Prompts list items from several categories and ask for the items of one category. "
         "Query = last prompt token; keys = the items' last tokens; positives = items of the "
         "asked category (one group per category).",),
        ("vocabulary",),
    ),
    "binding": TaskSpec(
        "binding", BindingFeaturesConfig, _binding,
        "binding: order-ID and lexical subspaces of box-letter binding (paper Figs. 8-10)",
        "Binding features: order-ID and lexical subspaces (Figs. 8–10)", 30,
        ("Prompts bind objects to box letters and ask which box holds one object. Query = last "
         "token; keys = box letters. Feature 'order': the answer letter vs the other letters. "
         "Feature 'lexical': the same letter when the queried object is bound to it vs when the "
         "question names an absent object (one-sided factual / counterfactual records).",),
    ),
    "agreement": TaskSpec(
        "agreement", AgreementTaskConfig, _agreement,
        "subject-verb agreement: which noun a verb agrees with in number",
        "Subject–verb agreement", 40,
        ("Query = the verb (last token); positive key = the subject noun (same number as the "
         "verb), negative key = an attractor noun of the other number; groups = the verb's "
         "number. The subject comes before the attractor in half the prompts and after it in "
         "the other half (--order), so the query–key offset alone cannot tell them apart; "
         "--numbers same is the role control (both nouns share the verb's number).",),
    ),
}  # fmt: skip


def task_config(name: str, *, seed: int = 0, chat: bool = False, **options: Any) -> Any:
    """The task's config from options (``seed``/``chat`` where the task has them)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; expected one of {', '.join(TASKS)}")
    spec = TASKS[name]
    names = {f.name for f in dataclasses.fields(spec.config)}
    kw = {k: v for k, v in options.items() if k in names}
    for k, v in (("seed", seed), ("chat", chat)):
        if k in names:
            kw[k] = v
    return spec.config(**kw)


def build_task_records(
    name: str, *, seed: int = 0, chat: bool = False, **options: Any
) -> list[ContrastRecord]:
    """Records of a built-in task (filter and binding pin ``meta["split"]``; agreement is
    split by the pipeline's seeded ``holdout``)."""
    return TASKS[name].build(task_config(name, seed=seed, chat=chat, **options))
