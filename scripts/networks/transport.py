"""Entropic optimal transport between two sets of tokens: batched log-domain Sinkhorn with padding masks.

Used by SSA (:mod:`scripts.networks.ssa`) to align visual tokens with report tokens in both directions and by its
loss (:mod:`scripts.losses.ssa`) to compare every image with every report of a batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["cosine_cost", "sinkhorn", "transport_cost", "barycentric"]


def _work_dtype(x: torch.Tensor) -> torch.dtype:
    # float16/bfloat16 lose the small entries of a plan (≈ 1 / (N·M)) and overflow exp(−C/ε): solve in float32;
    # float64 stays float64 (gradcheck)
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def cosine_cost(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cost ``1 − cos(xᵢ, yⱼ)`` in [0, 2], computed in float32 (or float64) whatever the inputs' dtype.

    Args:
        x: ...×N×d points.
        y: ...×M×d points.

    Returns:
        ...×N×M costs.
    """
    dtype = _work_dtype(x)
    with torch.autocast(x.device.type, enabled=False):
        x = F.normalize(x.to(dtype), dim=-1)
        y = F.normalize(y.to(dtype), dim=-1)
        return 1.0 - x @ y.transpose(-1, -2)


def sinkhorn(
    cost: torch.Tensor,
    mask_x: torch.Tensor | None = None,
    mask_y: torch.Tensor | None = None,
    epsilon: float = 0.05,
    max_iter: int = 100,
    tol: float = 1e-4,
    check_every: int = 10,
) -> torch.Tensor:
    """Entropic optimal transport plan between uniform distributions on the real points of two padded sets.

    Solves ``min_P ⟨P, C⟩ − ε·H(P)`` subject to ``P·1 = a`` and ``Pᵀ·1 = b``, with ``a`` (``b``) uniform over the
    points where ``mask_x`` (``mask_y``) is true and zero on padding. Log-domain Sinkhorn (scaled duals
    ``u = f/ε``, ``v = g/ε`` updated with log-sum-exp), so small ε (0.01) and large costs neither underflow nor
    overflow; it runs in float32 for float16/bfloat16 inputs and returns the plan in the input's dtype.

    The iterations stop early once the row marginals are within ``tol`` (L1 over the batch's worst sample; total
    mass is 1), checked every ``check_every`` iterations: each check waits for the device, so checking at every
    iteration would stall a GPU ~100 times per solve. The last update is always the column one, so the column marginals hold to rounding. Gradients flow
    through the unrolled iterations.

    A sample with no real point on either side (a report-free sample) gets an all-zero plan.

    Args:
        cost: B×N×M costs (finite; any scale, the plan depends on C/ε).
        mask_x: B×N, true (1) where a row point is real, false (0) for padding; None: all real.
        mask_y: B×M, the same for the column points (e.g. a report's attention mask).
        epsilon: entropic regularisation ε, in the units of the cost.
        max_iter: maximum Sinkhorn iterations (one row and one column update each).
        tol: early-stop threshold on the L1 error of the row marginals; 0 runs all ``max_iter`` iterations.
        check_every: iterations between two checks of that error.

    Returns:
        B×N×M transport plan; each sample's entries sum to 1 (0 for an empty sample).
    """
    if epsilon <= 0:
        raise ValueError(f"epsilon must be positive, got {epsilon}")
    if cost.dim() != 3:
        raise ValueError(f"cost must be B×N×M, got shape {tuple(cost.shape)}")
    out_dtype, dtype = cost.dtype, _work_dtype(cost)
    b, n, m = cost.shape
    dev = cost.device
    mx = torch.ones(b, n, dtype=torch.bool, device=dev) if mask_x is None else mask_x.to(dev).bool()
    my = torch.ones(b, m, dtype=torch.bool, device=dev) if mask_y is None else mask_y.to(dev).bool()
    nonempty = mx.any(dim=1) & my.any(dim=1)
    # empty samples are solved as if fully real (keeps every quantity finite) and zeroed at the end
    mx = mx | ~nonempty[:, None]
    my = my | ~nonempty[:, None]
    with torch.autocast(dev.type, enabled=False):
        # padding entries of the cost may hold anything (NaN from a zero vector): they are never used
        valid = mx[:, :, None] & my[:, None, :]
        log_k = -cost.to(dtype).masked_fill(~valid, 0.0) / epsilon
        neg_inf = torch.tensor(float("-inf"), dtype=dtype, device=dev)
        # log marginals: −log(count) on real points, −inf on padding, so padding duals stay −inf and carry no mass
        log_a = torch.where(mx, -mx.sum(1, keepdim=True).to(dtype).log(), neg_inf)
        log_b = torch.where(my, -my.sum(1, keepdim=True).to(dtype).log(), neg_inf)
        u = torch.where(mx, 0.0, neg_inf)
        v = torch.where(my, 0.0, neg_inf)
        for it in range(max(int(max_iter), 1)):
            row_lse = torch.logsumexp(log_k + v[:, None, :], dim=2)
            if tol > 0 and it > 0 and it % max(int(check_every), 1) == 0:
                # row marginals of the current plan, exp(u + row_lse), at no extra cost
                with torch.no_grad():
                    err = ((u + row_lse).exp().nan_to_num(0.0) - log_a.exp()).abs().sum(1).max()
                if float(err) < tol:
                    break
            u = log_a - row_lse
            v = log_b - torch.logsumexp(log_k + u[:, :, None], dim=1)
        plan = torch.exp(log_k + u[:, :, None] + v[:, None, :])
        plan = plan * nonempty[:, None, None].to(dtype)
    return plan.to(out_dtype)


def transport_cost(plan: torch.Tensor, cost: torch.Tensor) -> torch.Tensor:
    """``⟨P, C⟩`` per sample (B), in the plan's working precision; padding entries of ``cost`` are ignored."""
    dtype = _work_dtype(cost)
    return (plan.to(dtype) * cost.to(dtype).nan_to_num(0.0)).sum(dim=(-2, -1))


def barycentric(plan: torch.Tensor, values: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Transport ``values`` (the column points' features) onto the row points: ``Σⱼ Pᵢⱼ·yⱼ / Σⱼ Pᵢⱼ``.

    Each row point receives a convex combination of the column features it is matched with; a row without mass
    (padding, an empty sample) receives 0. For the other direction pass ``plan.transpose(-1, -2)``.

    Args:
        plan: B×N×M transport plan.
        values: B×M×C features of the column points.
        eps: floor of the row mass.

    Returns:
        B×N×C transported features, in ``values``' dtype.
    """
    dtype = _work_dtype(plan)
    with torch.autocast(plan.device.type, enabled=False):
        p = plan.to(dtype)
        mass = p.sum(dim=-1, keepdim=True)
        weights = p / mass.clamp_min(eps)
        return (weights @ values.to(dtype)).to(values.dtype)
