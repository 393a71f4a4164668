"""Mask search, rearrangement and the least-squares solvers, on hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import nnls

from qcstream.models.pruning.masks import TransformerView, flops_fraction, unit_cost
from qcstream.models.pruning.search import FisherSamples, pruning_loss, rearrange_mask, search_mask
from qcstream.models.pruning.solvers import NormalEquations, choose_solver, solve_gradient, solve_least_squares, solve_non_negative, solve_ridge
from qcstream.models.vit import VisionTransformer


@pytest.fixture
def view() -> TransformerView:
    """Two blocks, 5 tokens of width 32, 2 heads of 16 and 4 neurons per block."""
    model = VisionTransformer(img_size=(28, 28), patch_size=14, embed_dim=32, depth=2, num_heads=2, mlp_ratio=0.125)
    return TransformerView(model, [1])


def fisher_with_importance(heads: list[list[float]], neurons: list[list[float]]) -> FisherSamples:
    """One gradient sample whose squares are the given importances."""
    return FisherSamples([torch.tensor(h).sqrt()[None] for h in heads], [torch.tensor(n).sqrt()[None] for n in neurons])


def test_unit_cost_multiply_adds():
    cost = unit_cost(tokens=5, dim=32, head_dim=16)

    assert cost.head == 4 * 5 * 32 * 16 + 2 * 25 * 16  # 11040
    assert cost.neuron == 2 * 5 * 32


def test_flops_fraction_half_kept(view):
    # Kept: 2 heads (22080) and 4 neurons (1280) of 4 heads and 8 neurons (46720).
    assert flops_fraction(view, [2, 0], [4, 0]) == pytest.approx(23360 / 46720)


def test_search_keeps_important_heads(view):
    # Budget 23360: 2 heads leave room for 4 neurons (15 + 10 = 25); 1 head for all 8 (10 + 11 = 21).
    fisher = fisher_with_importance([[10, 1], [5, 2]], [[4, 3, 2, 1], [0.4, 0.3, 0.2, 0.1]])

    heads, neurons = search_mask(view, fisher, 0.5)

    assert [h.tolist() for h in heads] == [[1, 0], [1, 0]]
    assert [n.tolist() for n in neurons] == [[1, 1, 1, 1], [0, 0, 0, 0]]


def test_search_trades_head_for_neurons(view):
    # 2 heads: 6 + 1 + (4 + 4 + 3 + 3) = 21; 1 head: 6 + 20 = 26.
    fisher = fisher_with_importance([[6, 1], [1, 1]], [[4, 3, 2, 1], [4, 3, 2, 1]])

    heads, neurons = search_mask(view, fisher, 0.5)

    assert sum(int(h.sum()) for h in heads) == 1
    assert heads[0].tolist() == [1, 0]
    assert sum(int(n.sum()) for n in neurons) == 8


def test_search_rejects_bad_constraint(view):
    fisher = fisher_with_importance([[1, 1], [1, 1]], [[1] * 4, [1] * 4])

    with pytest.raises(ValueError, match="FLOPs constraint 1.5 must be in"):
        search_mask(view, fisher, 1.5)


def test_rearrangement_prunes_cancelling_units():
    # a and b cancel each other; the diagonal keeps a (importance 4) and prunes b and c,
    # leaving |b + c|^2 = 6.25. Pruning a and b together costs |a + b|^2 = 0.
    gradients = torch.tensor([[2.0, -2.0, 0.0], [0.0, 0.0, 1.5]])
    diagonal_choice = torch.tensor([1.0, 0.0, 0.0])

    rearranged = rearrange_mask(diagonal_choice, gradients)

    assert rearranged.tolist() == [0.0, 0.0, 1.0]
    assert pruning_loss(gradients, torch.tensor([1, 2])) == pytest.approx(6.25)
    assert pruning_loss(gradients, torch.tensor([0, 1])) == pytest.approx(0.0)


def test_rearrangement_keeps_unit_count():
    gradients = torch.randn(16, 12, generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([1.0] * 5 + [0.0] * 7)

    rearranged = rearrange_mask(mask, gradients)

    assert int(rearranged.sum()) == 5
    before = pruning_loss(gradients, torch.nonzero(mask == 0).flatten())
    after = pruning_loss(gradients, torch.nonzero(rearranged == 0).flatten())
    assert after <= before


def equations(a: np.ndarray, r: np.ndarray) -> NormalEquations:
    return NormalEquations(a.T @ a, a.T @ r, float(r @ r))


@pytest.fixture
def problem() -> tuple[np.ndarray, np.ndarray]:
    """A least-squares problem whose unconstrained solution has a negative entry."""
    rng = np.random.default_rng(0)
    a = rng.normal(size=(40, 4))
    r = a @ np.array([1.5, -0.7, 0.4, 2.0]) + 0.01 * rng.normal(size=40)
    return a, r


def test_loss_is_squared_residual(problem):
    a, r = problem
    m = np.array([1.0, 0.5, -1.0, 2.0])

    assert equations(a, r).loss(m) == pytest.approx(float(np.sum((a @ m - r) ** 2)))


def test_least_squares_matches_lstsq(problem):
    a, r = problem

    np.testing.assert_allclose(solve_least_squares(equations(a, r)), np.linalg.lstsq(a, r, rcond=None)[0], rtol=1e-8)


def test_non_negative_matches_scipy(problem):
    a, r = problem

    values = solve_non_negative(equations(a, r))

    assert values.min() >= 0
    np.testing.assert_allclose(values, nnls(a, r)[0], atol=1e-6)


def test_strong_ridge_stays_at_one(problem):
    a, r = problem

    np.testing.assert_allclose(solve_ridge(equations(a, r), strength=1e6), np.ones(4), atol=1e-3)


def test_gradient_descent_reaches_least_squares(problem):
    a, r = problem
    system = equations(a, r)

    values = solve_gradient(system, steps=5000)

    assert system.loss(values) < system.loss(np.ones(4))
    np.testing.assert_allclose(values, solve_least_squares(system), atol=1e-3)


def test_held_out_frames_choose_solver():
    # Fitting frames ask for mask values 2, held-out frames for the unpruned 1: only keeping 1 fits them.
    rng = np.random.default_rng(2)
    a_fit, a_held = rng.normal(size=(30, 3)), rng.normal(size=(30, 3))
    fitting = equations(a_fit, a_fit @ np.full(3, 2.0))
    held_out = equations(a_held, a_held @ np.ones(3))

    choice = choose_solver(fitting, held_out)

    assert choice.solver == "unchanged"
    assert choice.relative_losses["unchanged"] == pytest.approx(0.0, abs=1e-12)
    assert choice.relative_losses["least squares"] == pytest.approx(1.0, rel=1e-6)
    assert set(choice.relative_losses) >= {"least squares", "non-negative", "gradient", "ridge 0.01"}
