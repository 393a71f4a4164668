"""Least-squares solvers for the mask values of one layer, and the search over them.

Each layer's branch output is linear in its mask values m, so the fit of the
pruned branch to the original layer output is a least-squares problem
``min |A m - r|^2``. It is accumulated as normal equations: ``Q = A^T A``,
``p = A^T r`` and ``c = r^T r``, on fitting frames and, separately, on held-out
frames. Every solver fits on the fitting frames; the held-out loss picks one.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy.optimize import nnls

#: Relative strengths of the ridge penalty, as fractions of the mean diagonal of Q.
RIDGE_STRENGTHS = (1e-3, 1e-2, 1e-1)
GRADIENT_STEPS = 200


@dataclasses.dataclass
class NormalEquations:
    """``Q``, ``p`` and ``c`` of a least-squares problem, summed over frames."""

    q: np.ndarray
    p: np.ndarray
    c: float = 0.0

    @classmethod
    def zeros(cls, size: int) -> "NormalEquations":
        return cls(np.zeros((size, size)), np.zeros(size), 0.0)

    def add(self, q: np.ndarray, p: np.ndarray, c: float) -> None:
        self.q += q
        self.p += p
        self.c += c

    def __add__(self, other: "NormalEquations") -> "NormalEquations":
        return NormalEquations(self.q + other.q, self.p + other.p, self.c + other.c)

    def loss(self, m: np.ndarray) -> float:
        """``|A m - r|^2``; relative to ``c`` it is the share of the target the layer misses."""
        return float(m @ self.q @ m - 2 * self.p @ m + self.c)


def solve_least_squares(system: NormalEquations) -> np.ndarray:
    return np.linalg.lstsq(system.q, system.p, rcond=None)[0]


def solve_ridge(system: NormalEquations, strength: float) -> np.ndarray:
    """Least squares with a penalty ``lam |m - 1|^2``: shrinks towards the unpruned mask values."""
    size = len(system.p)
    lam = strength * max(float(np.trace(system.q)) / size, 1e-12)
    return np.linalg.solve(system.q + lam * np.eye(size), system.p + lam * np.ones(size))


def solve_non_negative(system: NormalEquations) -> np.ndarray:
    """Least squares with ``m >= 0``, through the Cholesky factor ``Q = L L^T``: ``|L^T m - L^-1 p|``."""
    size = len(system.p)
    jitter = 1e-10 * max(float(np.trace(system.q)) / size, 1e-12)
    factor = np.linalg.cholesky(system.q + jitter * np.eye(size))
    target = np.linalg.solve(factor, system.p)
    return nnls(factor.T, target, maxiter=50 * size)[0]


def solve_gradient(system: NormalEquations, steps: int = GRADIENT_STEPS) -> np.ndarray:
    """Gradient descent from the unpruned values 1, step 1 / largest eigenvalue; stopping early regularises."""
    largest = float(np.linalg.eigvalsh(system.q)[-1])
    m = np.ones(len(system.p))
    if largest <= 0:
        return m
    for _ in range(steps):
        m -= (system.q @ m - system.p) / largest
    return m


def solvers() -> dict:
    """The solvers by name; "unchanged" keeps the values 1 (tuning must beat it on held-out frames)."""
    found = {
        "unchanged": lambda system: np.ones(len(system.p)),
        "least squares": solve_least_squares,
        "non-negative": solve_non_negative,
        "gradient": solve_gradient,
    }
    return found | {f"ridge {strength:g}": (lambda system, s=strength: solve_ridge(system, s)) for strength in RIDGE_STRENGTHS}


def _solve(solver, system: NormalEquations) -> np.ndarray | None:
    try:
        values = solver(system)
    except (np.linalg.LinAlgError, RuntimeError, ValueError):
        return None
    return values if np.all(np.isfinite(values)) else None


@dataclasses.dataclass
class SolverChoice:
    """The solver a layer kept, its mask values and every solver's held-out loss relative to the target."""

    solver: str
    values: np.ndarray
    relative_losses: dict[str, float]


def choose_solver(fitting: NormalEquations, held_out: NormalEquations) -> SolverChoice:
    """Fit each solver on ``fitting``, keep the lowest ``held_out`` loss, and refit that solver on both."""
    scale = max(held_out.c, 1e-30)
    losses = {}
    for name, solver in solvers().items():
        values = _solve(solver, fitting)
        if values is not None:
            losses[name] = held_out.loss(values) / scale
    chosen = min(losses, key=losses.get)
    refit = _solve(solvers()[chosen], fitting + held_out)
    return SolverChoice(chosen, refit if refit is not None else np.ones(len(fitting.p)), losses)
