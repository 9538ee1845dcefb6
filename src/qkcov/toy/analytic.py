"""Analytic and sampled contrastive covariances of the simplified setting.

Ignoring noise and payload, ``ΔC(z1) = W_Q B1 (E[z1* z1*ᵀ] − E[z1* z1'ᵀ]) A1ᵀ W_Kᵀ``. With a
fresh independent ``z1'`` and isotropic unit-variance latents (binary, raw Gaussian and
sphere-normalised Gaussian alike: :meth:`ToyDGP.second_moment`) the bracket is the
identity, so ``ΔC(z1) = (W_Q B1)(W_K A1)ᵀ``: rank N, column space ``span(W_Q B1)``, row
space ``span(W_K A1)``. Likewise for z2; ``"both"`` gives the sum.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..config import check_positive_int
from ..core.covariance import ContrastiveCovariance
from .data import ToyDGP, check_factor
from .model import ToyModel

__all__ = [
    "DEFAULT_N_PAIRS",
    "analytic_delta",
    "analytic_deltas",
    "estimate_deltas",
    "relative_error",
    "interaction_matrix",
]

#: contrast pairs per cell and factor; keeps the sampled ΔC within ~2-3% of the analytic one.
DEFAULT_N_PAIRS = 50_000


def analytic_delta(
    W_Q: torch.Tensor,
    W_K: torch.Tensor,
    B: torch.Tensor,
    A: torch.Tensor,
    second_moment: torch.Tensor | None = None,
) -> torch.Tensor:
    """``W_Q B S Aᵀ W_Kᵀ`` ``[d_head, d_head]`` (float64).

    ``W_Q, W_K [d_head, d_model]``, ``B, A [d_model, r]``; ``S = E[z zᵀ] − E[z z'ᵀ]`` ``[r, r]``
    defaults to the identity (independent fresh z', unit-variance latents).
    """
    if B.shape != A.shape or B.shape[0] != W_Q.shape[1] or A.shape[0] != W_K.shape[1]:
        raise ValueError(
            f"shape mismatch: W_Q {list(W_Q.shape)}, W_K {list(W_K.shape)}, B {list(B.shape)}, A {list(A.shape)}"
        )
    qb = W_Q.double() @ B.double()
    ka = W_K.double() @ A.double()
    if second_moment is not None:
        qb = qb @ second_moment.double()
    return qb @ ka.T


def analytic_deltas(model: ToyModel, dgp: ToyDGP, factor: str) -> torch.Tensor:
    """Analytic ΔC of every cell ``[K, d_head, d_head]`` for ``factor`` ("z1", "z2", "both").

    ``W_Q B S Aᵀ W_Kᵀ`` with ``S`` the DGP's exact latent second moment
    (:meth:`ToyDGP.second_moment`; the identity on active coordinates for every variant).
    """
    check_factor(factor)
    W_Q, W_K = model.W_Q.detach().double(), model.W_K.detach().double()
    pairs = {"z1": [("z1", dgp.B1, dgp.A1)], "z2": [("z2", dgp.B2, dgp.A2)]}
    pairs["both"] = pairs["z1"] + pairs["z2"]
    out = torch.zeros(W_Q.shape[0], W_Q.shape[1], W_K.shape[1], dtype=torch.float64)
    for f, B, A in pairs[factor]:  # padded columns are zero and contribute nothing
        S = dgp.second_moment(f)  # [K, L, L]
        out += (W_Q @ B.double() @ S) @ (W_K @ A.double()).transpose(1, 2)
    return out


@torch.no_grad()
def estimate_deltas(
    model: ToyModel,
    dgp: ToyDGP,
    factor: str,
    n: int = DEFAULT_N_PAIRS,
    seed: int = 0,
    chunk: int = 10_000,
    progress: bool = False,
) -> list[ContrastiveCovariance]:
    """Sampled ΔC: one :class:`ContrastiveCovariance` per cell from ``n`` contrast pairs.

    Pairs come from :meth:`ToyDGP.sample_contrast` (payload and noise as the DGP gives them)
    and pass through each cell's trained ``W_Q``/``W_K``.
    """
    check_factor(factor)
    check_positive_int("n", n)
    gen = torch.Generator().manual_seed(seed)
    K, H = model.n_cells, model.d_head
    accs = [ContrastiveCovariance(H, H) for _ in range(K)]
    done = 0
    with tqdm(
        total=n, desc=f"toy: ΔC({factor})", disable=None if progress else True, leave=False
    ) as bar:
        while done < n:
            m = min(chunk, n - done)
            cb = dgp.sample_contrast(factor, m, gen)
            q, kp, kn = model.queries(cb.x_q), model.keys(cb.x_pos), model.keys(cb.x_neg)
            for i, acc in enumerate(accs):
                acc.update(q[i], kp[i], kn[i])
            done += m
            bar.update(m)
    return accs


def relative_error(estimate: torch.Tensor, reference: torch.Tensor) -> float:
    """``‖estimate − reference‖_F / ‖reference‖_F``."""
    ref = reference.double()
    return float(torch.linalg.norm(estimate.double() - ref) / torch.linalg.norm(ref))


def interaction_matrix(model: ToyModel, dgp: ToyDGP, cell: int) -> torch.Tensor:
    """``G = (W_Q B)ᵀ (W_K A)`` ``[N+M, N+M]`` for one cell, ``B = [B1 B2]``, ``A = [A1 A2]``.

    Rows index query latents (z1 then z2), columns key latents.
    """
    c = dgp.configs[cell]
    B = torch.cat([dgp.B1[cell, :, : c.n_z1], dgp.B2[cell, :, : c.n_z2]], dim=1).double()
    A = torch.cat([dgp.A1[cell, :, : c.n_z1], dgp.A2[cell, :, : c.n_z2]], dim=1).double()
    W_Q, W_K = model.W_Q[cell].detach().double(), model.W_K[cell].detach().double()
    return (W_Q @ B).T @ (W_K @ A)
