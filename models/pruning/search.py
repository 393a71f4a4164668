"""Fisher information of the masks, the mask search under a FLOPs constraint, and mask rearrangement.

The loss is the distortion of the backbone's output features f(x; m) from the
unpruned ones. Its gradient at m = 1 is zero, so the Fisher information is
taken for a Gaussian model of the features: with v ~ N(0, I), the gradient
g = d(v . f)/dm satisfies E[g g^T] = J^T J, the Gauss-Newton matrix of the
squared distortion (J = df/dm). Each (frame, draw) gives one gradient sample;
the diagonal of the Fisher matrix ranks units, and its blocks within a layer
drive the rearrangement.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Iterable

import numpy as np
import torch
from tqdm import tqdm

from qcstream.models.pruning.masks import Masks, TransformerView, flops_fraction

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class FisherSamples:
    """Gradient samples of the mask variables: ``heads[i]`` is ``(S, heads of block i)``, ``neurons[i]`` ``(S, neurons)``."""

    heads: list[torch.Tensor]
    neurons: list[torch.Tensor]

    def head_importance(self) -> list[torch.Tensor]:
        return [g.pow(2).sum(0) for g in self.heads]

    def neuron_importance(self) -> list[torch.Tensor]:
        return [g.pow(2).sum(0) for g in self.neurons]


def collect_fisher(view: TransformerView, batches: Iterable, total: int | None = None, draws: int = 2, seed: int = 0, progress: bool = True) -> FisherSamples:
    """Gradient samples of the projected output features with respect to every head and neuron mask.

    ``draws`` random projections per frame; ``seed`` fixes them.
    """
    generator = torch.Generator().manual_seed(seed)
    trainable = [parameter for parameter in view.model.parameters() if parameter.requires_grad]
    for parameter in trainable:
        parameter.requires_grad_(False)

    try:
        samples = _gradient_samples(view, batches, total, draws, generator, progress)
    finally:
        for parameter in trainable:
            parameter.requires_grad_(True)
    return samples


def _gradient_samples(view: TransformerView, batches: Iterable, total: int | None, draws: int, generator: torch.Generator, progress: bool) -> FisherSamples:
    head_grads: list[list[torch.Tensor]] = [[] for _ in view.blocks]
    neuron_grads: list[list[torch.Tensor]] = [[] for _ in view.blocks]
    with Masks(view) as masks:
        for batch in tqdm(batches, total=total, desc="Fisher information", unit="batch", disable=not progress):
            masks.per_frame(_frames(batch))
            features = view.features(batch)
            for draw in range(draws):
                projection = torch.randn(features.shape, generator=generator)
                grads = torch.autograd.grad((features * projection).sum(), masks.parameters(), retain_graph=draw < draws - 1)
                for index in range(len(view.blocks)):
                    head_grads[index].append(grads[index].detach())
                    neuron_grads[index].append(grads[len(view.blocks) + index].detach())
    if not head_grads[0]:
        raise ValueError("no frames for the Fisher information: pruning needs normal frames")
    return FisherSamples([torch.cat(g) for g in head_grads], [torch.cat(g) for g in neuron_grads])


def _frames(batch) -> int:
    return int(batch.shape[0]) if isinstance(batch, torch.Tensor) else int(batch[0].shape[0])


def search_mask(view: TransformerView, fisher: FisherSamples, flops: float) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Binary head and neuron masks that keep the most Fisher importance within ``flops`` of the prunable FLOPs.

    For every possible total of kept heads, the most important heads are kept and
    the most important neurons fill the FLOPs left. The total with the largest
    kept importance wins.
    """
    if not 0.0 < flops <= 1.0:
        raise ValueError(f"FLOPs constraint {flops} must be in (0, 1]; 1.0 keeps everything, 0.5 halves the prunable multiply-adds")
    cost = view.cost()
    budget = flops * (sum(view.num_heads) * cost.head + sum(view.num_neurons) * cost.neuron)

    head_scores = torch.cat(fisher.head_importance())
    neuron_scores = torch.cat(fisher.neuron_importance())
    head_order = head_scores.argsort(descending=True)
    neuron_order = neuron_scores.argsort(descending=True)
    head_cumulative = torch.cat([torch.zeros(1, dtype=torch.float64), head_scores[head_order].double().cumsum(0)])
    neuron_cumulative = torch.cat([torch.zeros(1, dtype=torch.float64), neuron_scores[neuron_order].double().cumsum(0)])

    best_heads, best_neurons, best_score = 0, 0, -1.0
    for kept_heads in range(len(head_scores) + 1):
        left = budget - kept_heads * cost.head
        if left < 0:
            break
        kept_neurons = min(len(neuron_scores), int(left // cost.neuron))
        score = float(head_cumulative[kept_heads] + neuron_cumulative[kept_neurons])
        if score > best_score:
            best_heads, best_neurons, best_score = kept_heads, kept_neurons, score

    head_mask = torch.zeros(len(head_scores))
    head_mask[head_order[:best_heads]] = 1.0
    neuron_mask = torch.zeros(len(neuron_scores))
    neuron_mask[neuron_order[:best_neurons]] = 1.0
    heads = list(head_mask.split(view.num_heads))
    neurons = list(neuron_mask.split(view.num_neurons))
    logger.info(
        "Mask search at FLOPs %.2f: keeping %d of %d heads and %d of %d neurons (%.3f of the prunable multiply-adds)",
        flops, best_heads, len(head_scores), best_neurons, len(neuron_scores),
        flops_fraction(view, [int(h.sum()) for h in heads], [int(n.sum()) for n in neurons]),
    )
    return heads, neurons


def pruning_loss(gradients: torch.Tensor, pruned: torch.Tensor) -> float:
    """Second-order estimate of the distortion from zeroing the units ``pruned`` (indices into the columns).

    With gradient samples ``G`` (S, units), it is the squared norm of the sum of
    the pruned columns: the quadratic form of the Fisher block on the mask change.
    """
    return float(gradients[:, pruned].sum(1).pow(2).sum())


def rearrange_mask(mask: torch.Tensor, gradients: torch.Tensor, max_passes: int = 3) -> torch.Tensor:
    """Re-choose which units of one layer are kept, keeping their number, to lower :func:`pruning_loss`.

    The search uses the layer's full Fisher block. Each kept unit, least important
    first, may swap with the pruned unit whose return lowers the loss most. A pass
    with no swap ends the search.
    """
    pruned = np.flatnonzero(mask.numpy() == 0)
    kept = np.flatnonzero(mask.numpy() != 0)
    if not len(pruned) or not len(kept):
        return mask.clone()

    gradients = gradients.double().numpy()
    squared_norms = (gradients**2).sum(0)
    pruned_sum = gradients[:, pruned].sum(1)
    for _ in range(max_passes):
        swapped = False
        for position in np.argsort(squared_norms[kept], kind="stable"):
            candidate = kept[position]
            # Put the candidate into the pruned set, then take back out the member whose removal leaves the least loss:
            # |w - g_j|^2 = |w|^2 - 2 w.g_j + |g_j|^2 with w the pruned sum plus the candidate.
            with_candidate = pruned_sum + gradients[:, candidate]
            losses = with_candidate @ with_candidate - 2 * (with_candidate @ gradients[:, pruned]) + squared_norms[pruned]
            best = int(losses.argmin())
            if losses[best] < (pruned_sum @ pruned_sum) * (1 - 1e-9):
                released = pruned[best]
                pruned[best] = candidate
                kept[position] = released
                pruned_sum = with_candidate - gradients[:, released]
                swapped = True
        if not swapped:
            break

    rearranged = torch.zeros_like(mask)
    rearranged[torch.from_numpy(kept)] = 1.0
    return rearranged
