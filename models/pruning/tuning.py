"""Mask tuning: real-valued mask values fitted block by block to reproduce the original block outputs.

Blocks are tuned in order. The pruned model (earlier blocks already tuned)
gives the inputs, the original model gives the targets, so each block also
corrects the error that the blocks before it left. Within a block the attention
branch is tuned first, then the MLP branch on the tuned attention's output.
A branch's output is linear in its mask values:

- attention: ``x + gamma * (sum_h m_h O_h W_h^T + b)``, with ``O_h`` the output
  of head ``h`` and ``W_h`` its columns of the output projection;
- MLP: ``x + gamma * (sum_n m_n a_n w_n^T + b)``, with ``a_n`` the activation of
  neuron ``n`` and ``w_n`` its column of ``fc2``;

so the fit is least squares, solved with the solver that :func:`choose_solver` keeps.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Sequence

import numpy as np
import torch
from tqdm import tqdm

from qcstream.models.pruning.masks import TransformerView
from qcstream.models.pruning.solvers import NormalEquations, choose_solver

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class BranchFit:
    """Tuning record of one branch: the solver kept and the held-out losses relative to the target."""

    block: int
    branch: str
    kept: int
    total: int
    solver: str
    relative_losses: dict[str, float]

    @property
    def loss(self) -> float:
        return self.relative_losses[self.solver]

    def describe(self) -> str:
        untuned = self.relative_losses.get("unchanged", float("nan"))
        return (
            f"block {self.block} {self.branch}: {self.kept}/{self.total} kept, solver {self.solver}, "
            f"held-out loss {self.loss:.4g} (untuned {untuned:.4g})"
        )


def _gamma(scale_layer: torch.nn.Module, dim: int) -> torch.Tensor:
    return scale_layer.gamma.detach() if hasattr(scale_layer, "gamma") else torch.ones(dim)


def head_outputs(attention, x: torch.Tensor) -> torch.Tensor:
    """Per-head attention outputs ``(B, H, T, d)`` for normed input ``x``, before the output projection."""
    q = attention._split_heads(attention.query(x))
    k = attention._split_heads(attention.key(x))
    v = attention._split_heads(attention.value(x))
    weights = attention.attn_softmax((q * attention.scale) @ k.transpose(-2, -1))
    return weights @ v


def _attention_terms(block, x_in: torch.Tensor, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Compute the kept heads' contributions ``(B*T*D, k)`` and the branch's constant part ``(B, T, D)``."""
    attention = block.attn
    dim = attention.proj.out_features
    gamma = _gamma(block.ls1, dim)
    outputs = head_outputs(attention, block.norm1(x_in))[:, kept]
    weight = attention.proj.weight.view(dim, attention.num_heads, attention.head_dim)[:, kept]
    contributions = torch.einsum("bhtd,ohd->btoh", outputs, weight) * gamma[:, None]
    constant = gamma * attention.proj.bias if attention.proj.bias is not None else torch.zeros(dim)
    return contributions.reshape(-1, len(kept)), constant.expand_as(x_in)


def attention_output(block, x_in: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``x_in`` plus the attention branch with head mask ``values`` (one per head of the block)."""
    attention = block.attn
    outputs = head_outputs(attention, block.norm1(x_in)) * values[None, :, None, None]
    batch, heads, tokens, head_dim = outputs.shape
    return x_in + block.ls1(attention.proj(outputs.transpose(1, 2).reshape(batch, tokens, heads * head_dim)))


def mlp_output(block, x_in: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``x_in`` plus the MLP branch with neuron mask ``values``."""
    mlp = block.mlp
    activations = mlp.act(mlp.fc1(block.norm2(x_in))) * values
    return x_in + block.ls2(mlp.fc2(activations))


def _attention_equations(block, x_in: torch.Tensor, target: torch.Tensor, kept: torch.Tensor) -> tuple[np.ndarray, np.ndarray, float]:
    columns, constant = _attention_terms(block, x_in, kept)
    residual = (target - x_in - constant).reshape(-1)
    columns = columns.double()
    residual = residual.double()
    return (columns.T @ columns).numpy(), (columns.T @ residual).numpy(), float(residual @ residual)


def _mlp_equations(block, x_in: torch.Tensor, target: torch.Tensor, kept: torch.Tensor) -> tuple[np.ndarray, np.ndarray, float]:
    """Normal equations of the MLP branch without forming its ``(B*T*D, k)`` matrix.

    Column n is ``a_n (x) (gamma * w_n)``, so ``Q = (a^T a) * (w'^T w')`` elementwise
    and ``p_n = sum_t a_n(t) (w'_n . r(t))``.
    """
    mlp = block.mlp
    dim = mlp.fc2.out_features
    gamma = _gamma(block.ls2, dim)
    activations = mlp.act(mlp.fc1(block.norm2(x_in)))[..., kept].reshape(-1, len(kept)).double()
    weight = (gamma[:, None] * mlp.fc2.weight[:, kept]).double()
    constant = gamma * mlp.fc2.bias if mlp.fc2.bias is not None else torch.zeros(dim)
    residual = (target - x_in - constant).reshape(-1, dim).double()
    q = (activations.T @ activations) * (weight.T @ weight)
    p = (activations * (residual @ weight)).sum(0)
    return q.numpy(), p.numpy(), float((residual * residual).sum())


class _Branch:
    """One branch of one block: accumulates its equations and applies mask values."""

    def __init__(self, name: str, equations, output) -> None:
        self.name = name
        self.equations = equations
        self.output = output


BRANCHES = (_Branch("attention", _attention_equations, attention_output), _Branch("mlp", _mlp_equations, mlp_output))


@torch.no_grad()
def tune_masks(
    view: TransformerView,
    heads: Sequence[torch.Tensor],
    neurons: Sequence[torch.Tensor],
    batches: Sequence,
    held_out_every: int = 4,
    progress: bool = True,
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[BranchFit]]:
    """Fit real mask values for the kept heads and neurons; pruned units stay 0.

    Every ``held_out_every``-th batch is held out to choose the solver (all batches
    fit and choose when there are fewer than two). Returns the tuned head and
    neuron values per block and one :class:`BranchFit` per branch.
    """
    if not batches:
        raise ValueError("mask tuning needs normal frames")
    held_out = [i % held_out_every == held_out_every - 1 for i in range(len(batches))]
    if not any(held_out) or all(held_out):
        held_out = [False] * len(batches)
        logger.warning("Only %d tuning batch(es): the solver is chosen on the frames it was fitted on", len(batches))

    teacher = [view.embed(batch) for batch in batches]
    student = [(x.clone(), added) for x, added in teacher]
    tuned_heads = [h.clone().float() for h in heads]
    tuned_neurons = [n.clone().float() for n in neurons]
    fits: list[BranchFit] = []

    for index in tqdm(range(len(view.blocks)), desc="mask tuning", unit="block", disable=not progress):
        block = view.blocks[index]
        teacher_in = [view.block_input(x, added) for x, added in teacher]
        student_in = [view.block_input(x, added) for x, added in student]
        for branch, values in zip(BRANCHES, (tuned_heads[index], tuned_neurons[index])):
            full = torch.ones_like(values)
            teacher_out = [branch.output(block, x, full) for x in teacher_in]
            kept = torch.nonzero(values).flatten()
            if 0 < len(kept):
                fits.append(_fit_branch(index, branch, block, student_in, teacher_out, kept, values, held_out))
                logger.info("Mask tuning, %s", fits[-1].describe())
            student_in = [branch.output(block, x, values) for x in student_in]
            teacher_in = teacher_out
        teacher = [(x, added) for x, (_, added) in zip(teacher_in, teacher)]
        student = [(x, added) for x, (_, added) in zip(student_in, student)]

    return tuned_heads, tuned_neurons, fits


def _fit_branch(index, branch: _Branch, block, inputs, targets, kept: torch.Tensor, values: torch.Tensor, held_out: list[bool]) -> BranchFit:
    """Fit ``values[kept]`` in place and describe the fit."""
    fitting = NormalEquations.zeros(len(kept))
    checking = NormalEquations.zeros(len(kept))
    for x_in, target, is_held_out in zip(inputs, targets, held_out):
        (checking if is_held_out else fitting).add(*branch.equations(block, x_in, target, kept))
    if not any(held_out):
        checking = fitting
    choice = choose_solver(fitting, checking)
    values[kept] = torch.as_tensor(choice.values, dtype=values.dtype)
    return BranchFit(index, branch.name, len(kept), len(values), choice.solver, choice.relative_losses)
