"""Power of the relational exchange test against the number of record pairs.

Planted relational heads shaped like real ones (``tests/core/test_relational.py``: a dominant
shared query direction, keys of unequal variance; query and positive key share a per-record
vector of the given strength), rank-3 key subspace from build records, the exact sign-flip
test on held-out records paired at random. Prints, per strength, how many of ``--seeds``
seeds reject at α = 0.05 for each held-out size (pairs = records / 2). The verdict does not
count a failure to reject against the feature with fewer than
:data:`qkcov.core.conditional.MIN_RELATION_PAIRS` pairs.

    python benchmarks/relational_power.py [--seeds 100]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests" / "core"), str(ROOT / "tests")]

import test_relational as T  # noqa: E402

from qkcov.core.relational import pair_partners, relation_patch, relation_test  # noqa: E402
from qkcov.core.subspace import feature_subspace  # noqa: E402


def p_value(seed: int, m: int, strength: float) -> tuple[float, int]:
    stats, q, kp, kn = T._planted(seed, "relation", m=m, strength=strength)
    basis = feature_subspace(stats.delta(), rank=3).key_basis
    partner, _ = pair_partners(None, n=q.shape[0], seed=seed)
    eff = relation_patch(q, kp, kn, partner, basis)["effect"][0]
    t = relation_test(eff, partner, n_draws=999, seed=seed)
    return t.p_value, t.n_pairs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=100)
    args = ap.parse_args()
    for strength in (0.6, 0.8, 1.0, 1.5):
        row = []
        for m in (8, 14, 20, 24, 30, 40):
            ps = [p_value(s, m, strength) for s in range(args.seeds)]
            hits = sum(p < 0.05 for p, _ in ps)
            row.append(f"{ps[0][1]} pairs: {hits}/{args.seeds}")
        print(f"strength {strength}: " + "; ".join(row))


if __name__ == "__main__":
    main()
