"""A two-name (indirect-object) contrast: "When Mary and John went to the store, John gave a
drink to" — query = the last token, positive key = the indirect object's name (Mary),
negative key = the subject's first mention (John), answer = " Mary".

``python benchmarks/name_mover.py --n 200 --out name_mover.jsonl [--coin-flip]`` writes the
records (``--coin-flip``: each record's positive and negative swapped by a fair coin, the
labels then carry nothing; the answer is unchanged).
"""

from __future__ import annotations

import argparse
import random

from qkcov.tasks.records import ContrastRecord, Span, find_spans, save_records

NAMES = [
    "Mary", "John", "Anna", "David", "Sarah", "James", "Laura", "Peter", "Emma", "Paul",
    "Alice", "Tom", "Kate", "Mark", "Lucy", "Daniel", "Sophie", "Michael", "Julia", "Robert",
]  # fmt: skip
PLACES = ["store", "park", "school", "beach", "office", "market", "station", "garden"]
OBJECTS = ["drink", "book", "letter", "ball", "gift", "key", "ticket", "flower"]


def build(
    n: int = 200, seed: int = 0, coin_flip: bool = False, io_first: bool = False
) -> list[ContrastRecord]:
    """``io_first``: the indirect object is always named first (else either order)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        io, s = rng.sample(NAMES, 2)
        first, second = (io, s) if io_first or rng.random() < 0.5 else (s, io)
        prompt = (
            f"When {first} and {second} went to the {rng.choice(PLACES)}, {s} gave a "
            f"{rng.choice(OBJECTS)} to"
        )
        (i0, i1), (s0, s1) = find_spans(prompt, io)[0], find_spans(prompt, s)[0]
        pos, neg = (Span(i0, i1, label=io),), (Span(s0, s1, label=s),)
        flipped = coin_flip and rng.random() < 0.5
        if flipped:
            pos, neg = neg, pos
        meta = {"task": "name-mover", "io": io, "subject": s, "index": i, "flipped": flipped}
        out.append(ContrastRecord(prompt, pos, neg, meta=meta, answer=f" {io}"))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--coin-flip", action="store_true")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    save_records(a.out, build(a.n, a.seed, a.coin_flip))


if __name__ == "__main__":
    main()
