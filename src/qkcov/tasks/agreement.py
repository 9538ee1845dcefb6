"""Subject–verb number agreement: which noun a verb agrees with (a contrast beyond the paper).

Prompt: ``"<lead-in>, the <subject> <preposition> the <attractor> <verb>"``. Query = the verb
(the last token); positive key = the subject noun, whose grammatical number the verb shares;
negative key = the attractor noun of the opposite number, everything else held fixed. Group =
the verb's number (``"singular"`` / ``"plural"``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from ..config import ConfigMixin, check_positive_int
from .records import ContrastRecord, Span, find_spans

__all__ = ["AgreementTaskConfig", "build_agreement_records", "NOUNS"]

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
    """``n`` records (seeded); each a subject/attractor pair of opposite numbers."""

    n: int = 240
    seed: int = 0

    def __post_init__(self) -> None:
        check_positive_int("n", self.n, 1)


def build_agreement_records(cfg: AgreementTaskConfig) -> list[ContrastRecord]:
    rng = random.Random(cfg.seed)
    out = []
    for i in range(cfg.n):
        s_idx, a_idx = rng.sample(range(len(NOUNS)), 2)
        plural = rng.random() < 0.5
        subj = NOUNS[s_idx][int(plural)]
        attr = NOUNS[a_idx][int(not plural)]
        verb = rng.choice(VERBS)[int(plural)]
        prompt = f"{rng.choice(LEAD_INS)}, the {subj} {rng.choice(PREPOSITIONS)} the {attr} {verb}"
        (s0, s1), (a0, a1) = find_spans(prompt, subj)[0], find_spans(prompt, attr)[0]
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
                    "index": i,
                    "seed": cfg.seed,
                },
            )
        )
    return out
