"""Subject–verb number agreement: which noun a verb agrees with (a contrast beyond the paper).

Query = the verb (the last token); positive key = the subject noun, whose grammatical number
the verb shares; negative key = the attractor noun, everything else held fixed. Group = the
verb's number (``"singular"`` / ``"plural"``). Two word orders:

- ``subject-first``: ``"<lead-in>, the <subject> <preposition> the <attractor> <verb>"`` —
  the subject is always the farther noun (offset ≈ 4–6 against the attractor's 1);
- ``attractor-first``: ``"<lead-in>, <preposition> the <attractor>, the <subject> <verb>"`` —
  the subject is always the nearer noun.

``order="both"`` (the default) draws the order per record by a fair coin, so neither offset
alone tells the subject from the attractor (in one order the labels are a function of the
offset; see ``docs/position.md``). ``numbers="opposite"`` (the default) gives the attractor the
other number; ``numbers="same"`` the same number as the subject — the *same-number control*: the
verb's number then cannot tell the two nouns apart, so a head that still prefers the subject
reads its role, not its number. Each record's ``meta`` names the order, the numbers and, under
``"keys"``, each key's role, number and query–key word order (``"nearer"`` / ``"farther"``), the
rival attributes a contrast can be controlled for or relabelled by.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from ..config import ConfigMixin, check_positive_int
from .records import ContrastRecord, Span, find_spans

__all__ = ["AgreementTaskConfig", "build_agreement_records", "NOUNS", "ORDERS", "NUMBERS"]

ORDERS = ("both", "subject-first", "attractor-first")
NUMBERS = ("opposite", "same")

NOUNS = (
    ("key", "keys"), ("dog", "dogs"), ("book", "books"), ("car", "cars"), ("teacher", "teachers"),
    ("bottle", "bottles"), ("picture", "pictures"), ("girl", "girls"), ("table", "tables"),
    ("window", "windows"), ("letter", "letters"), ("doctor", "doctors"), ("cat", "cats"),
    ("friend", "friends"), ("farmer", "farmers"), ("painting", "paintings"), ("lamp", "lamps"),
    ("student", "students"), ("box", "boxes"), ("chair", "chairs"),
)  # fmt: skip
PREPOSITIONS = ("near", "behind", "next to", "beside", "under", "above")
VERBS = (("is", "are"), ("was", "were"), ("has", "have"))
LEAD_INS = (
    "In the old house at the end of the quiet street",
    "Every morning before the market opens in town",
    "According to the notes written on the last page",
    "On the second floor of the small village school",
)


@dataclass
class AgreementTaskConfig(ConfigMixin):
    """``n`` records (seeded); each a subject/attractor pair (see the module docstring)."""

    n: int = 240
    seed: int = 0
    order: str = field(
        default="both",
        metadata={"help": "word order: subject-first, attractor-first or both (a coin per record)"},
    )
    numbers: str = field(
        default="opposite",
        metadata={"help": "attractor's number: opposite (the feature) or same (the role control)"},
    )

    def __post_init__(self) -> None:
        check_positive_int("n", self.n, 1)
        if self.order not in ORDERS:
            raise ValueError(f"--order must be one of {', '.join(ORDERS)}, got {self.order!r}")
        if self.numbers not in NUMBERS:
            raise ValueError(f"--numbers must be one of {', '.join(NUMBERS)}, got {self.numbers!r}")


def build_agreement_records(cfg: AgreementTaskConfig) -> list[ContrastRecord]:
    rng = random.Random(cfg.seed)
    out = []
    for i in range(cfg.n):
        s_idx, a_idx = rng.sample(range(len(NOUNS)), 2)
        plural = rng.random() < 0.5
        a_plural = plural if cfg.numbers == "same" else not plural
        subj = NOUNS[s_idx][int(plural)]
        attr = NOUNS[a_idx][int(a_plural)]
        verb = rng.choice(VERBS)[int(plural)]
        lead, prep = rng.choice(LEAD_INS), rng.choice(PREPOSITIONS)
        order = cfg.order
        if order == "both":
            order = "subject-first" if rng.random() < 0.5 else "attractor-first"
        if order == "subject-first":
            prompt = f"{lead}, the {subj} {prep} the {attr} {verb}"
        else:
            prompt = f"{lead}, {prep} the {attr}, the {subj} {verb}"
        (s0, s1), (a0, a1) = find_spans(prompt, subj)[0], find_spans(prompt, attr)[0]
        number = ("singular", "plural")
        subj_near = order == "attractor-first"
        keys = {
            "positives": [{"role": "subject", "number": number[plural],
                           "word_order": "nearer" if subj_near else "farther"}],
            "negatives": [{"role": "attractor", "number": number[a_plural],
                           "word_order": "farther" if subj_near else "nearer"}],
        }  # fmt: skip
        out.append(
            ContrastRecord(
                prompt,
                (Span(s0, s1, label=subj),),
                (Span(a0, a1, label=attr),),
                group="plural" if plural else "singular",
                meta={
                    "task": "agreement",
                    "subject": subj,
                    "attractor": attr,
                    "verb": verb,
                    "order": order,
                    "numbers": cfg.numbers,
                    "keys": keys,
                    "index": i,
                    "seed": cfg.seed,
                },
            )
        )
    return out
