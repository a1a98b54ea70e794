"""Log-domain Sinkhorn (scripts/networks/transport.py): known plans, marginals in float32/float16, padding,
stability with tiny ε and extreme costs, gradients."""

import math

import pytest
import torch

from scripts.networks.transport import barycentric, cosine_cost, sinkhorn, transport_cost


def _padded_problem(dtype: torch.dtype, seed: int = 0):
    """B = 3 cosine costs between 12 visual and 7 text points, with 7, 4 and 1 real text points."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(3, 12, 16, generator=g), torch.randn(3, 7, 16, generator=g)
    y[:, :3] = x[:, :3] + 0.2 * torch.randn(3, 3, 16, generator=g)  # some structure, so the plan is not flat
    mask = torch.zeros(3, 7, dtype=torch.bool)
    for i, n in enumerate((7, 4, 1)):
        mask[i, :n] = True
    return cosine_cost(x, y).to(dtype), mask


def test_two_by_two_plan_is_the_known_closed_form():
    # C = [[0, 1], [1, 0]] with uniform marginals: by symmetry P ∝ exp(−C/ε), i.e. p on the diagonal and
    # p·e^(−1/ε) off it, with 2p(1 + e^(−1/ε)) = 1
    cost = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])
    for eps in (0.5, 1.0):
        e = math.exp(-1 / eps)
        p = 1 / (2 * (1 + e))
        expected = torch.tensor([[[p, p * e], [p * e, p]]])
        torch.testing.assert_close(sinkhorn(cost, epsilon=eps), expected, atol=1e-6, rtol=1e-5)
    # a padded third column changes nothing and receives no mass, whatever its cost holds
    padded = torch.tensor([[[0.0, 1.0, float("nan")], [1.0, 0.0, 5.0]]])
    plan = sinkhorn(padded, mask_y=torch.tensor([[1, 1, 0]]), epsilon=0.5)
    torch.testing.assert_close(plan[..., :2], sinkhorn(cost, epsilon=0.5), atol=1e-6, rtol=1e-5)
    assert (plan[..., 2] == 0).all()


def test_vanishing_epsilon_recovers_the_assignment():
    cost = 1 - torch.eye(3)[[2, 0, 1]][None]  # row i matches column σ(i) at zero cost
    plan = sinkhorn(cost, epsilon=0.01, max_iter=100)
    torch.testing.assert_close(plan, torch.eye(3)[[2, 0, 1]][None] / 3, atol=1e-6, rtol=0)
    assert transport_cost(plan, cost).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.float16, 2e-3)])
def test_marginals_match_with_padding_in_float32_and_float16(dtype, tol):
    cost, mask = _padded_problem(dtype)
    plan = sinkhorn(cost, mask_y=mask, epsilon=0.05)
    assert plan.dtype == dtype
    p = plan.float()
    rows, cols = p.sum(2), p.sum(1)
    n_text = mask.sum(1, keepdim=True).float()
    # L1 errors, total mass 1: rows are uniform over the 12 visual points, columns over the real text points
    assert (rows - 1 / 12).abs().sum(1).max() < tol
    assert (cols - mask.float() / n_text).abs().sum(1).max() < tol
    assert (p[~mask[:, None, :].expand_as(p)] == 0).all()  # padding columns get nothing
    # the float16 solve is the float32 solve (float32 inside), rounded
    if dtype == torch.float16:
        ref = sinkhorn(cost.float(), mask_y=mask, epsilon=0.05)
        torch.testing.assert_close(p, ref, atol=2e-5, rtol=2e-3)


def test_early_stop_meets_the_tolerance_and_more_iterations_improve():
    cost, mask = _padded_problem(torch.float32, seed=1)

    def row_error(plan):
        return float((plan.sum(2) - 1 / 12).abs().sum(1).max())

    early = row_error(sinkhorn(cost, mask_y=mask, epsilon=0.05, tol=1e-3))
    full = row_error(sinkhorn(cost, mask_y=mask, epsilon=0.05, tol=0))
    assert full < early < 1e-3  # met the tolerance and stopped there, before the 100 iterations
    one = row_error(sinkhorn(cost, mask_y=mask, epsilon=0.05, max_iter=1, tol=0))
    assert full < 1e-5 < 0.1 < one


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("scale", [1.0, 1e3, 6e4])
def test_tiny_epsilon_and_extreme_costs_stay_finite(dtype, scale):
    g = torch.Generator().manual_seed(0)
    cost = (torch.rand(2, 9, 5, generator=g) * scale).to(dtype)  # C/ε up to 6·10⁶
    cost[0, 0, 0] = 0.0
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], dtype=torch.bool)
    plan = sinkhorn(cost, mask_y=mask, epsilon=0.01, max_iter=50).float()
    assert torch.isfinite(plan).all() and (plan >= 0).all()
    torch.testing.assert_close(plan.sum((1, 2)), torch.ones(2), atol=2e-3, rtol=0)
    # the last update is the column one: column marginals hold however far the rows are from converged
    torch.testing.assert_close(plan.sum(1), mask.float() / mask.sum(1, keepdim=True), atol=2e-3, rtol=0)


def test_report_free_sample_gets_an_empty_plan_and_finite_gradients():
    cost = torch.rand(2, 6, 4, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0], [0, 0, 0, 0]])
    plan = sinkhorn(cost, mask_y=mask, epsilon=0.01)
    assert (plan[1] == 0).all() and plan[0].sum().item() == pytest.approx(1.0, abs=1e-4)
    transport_cost(plan, cost).sum().backward()
    assert torch.isfinite(cost.grad).all()
    assert (cost.grad[1] == 0).all() and (cost.grad[0, :, 3] == 0).all()  # nothing reaches padding
    assert cost.grad[0, :, :3].abs().sum() > 0


def test_gradients_through_the_unrolled_iterations_match_finite_differences():
    g = torch.Generator().manual_seed(0)
    cost = torch.rand(2, 4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    weights = torch.rand(2, 4, 3, generator=g, dtype=torch.float64)

    def f(c):  # fixed iteration count (tol=0): early stopping would make the function piecewise
        return (sinkhorn(c, mask_y=mask, epsilon=0.1, max_iter=30, tol=0) * weights).sum(dim=(1, 2))

    assert torch.autograd.gradcheck(f, (cost,))


def test_barycentric_transport_is_a_convex_combination_in_both_directions():
    values = torch.randn(1, 3, 5)
    plan = torch.eye(3)[None] / 3  # a perfect matching
    torch.testing.assert_close(barycentric(plan, values), values)
    cost, mask = _padded_problem(torch.float32)
    plan = sinkhorn(cost, mask_y=mask, epsilon=0.05)
    text_values = torch.randn(3, 7, 4)
    moved = barycentric(plan, text_values)  # text features onto the 12 visual points
    lo = text_values.masked_fill(~mask[..., None], float("inf")).amin(1, keepdim=True)
    hi = text_values.masked_fill(~mask[..., None], float("-inf")).amax(1, keepdim=True)
    assert ((moved >= lo - 1e-5) & (moved <= hi + 1e-5)).all()  # padding values never leak in
    back = barycentric(plan.transpose(1, 2), torch.randn(3, 12, 4))  # visual features onto the text points
    assert back.shape == (3, 7, 4) and (back[~mask] == 0).all()


def test_cosine_cost_range_and_precision():
    x = torch.randn(2, 5, 8, dtype=torch.float16)
    c = cosine_cost(x, x)
    assert c.dtype == torch.float32 and (c >= -1e-5).all() and (c <= 2 + 1e-5).all()
    torch.testing.assert_close(torch.diagonal(c, dim1=1, dim2=2), torch.zeros(2, 5), atol=1e-5, rtol=0)
