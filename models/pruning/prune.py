"""Post-training structured pruning of a transformer: search, rearrange, tune, then remove.

:func:`prune_transformer` runs the four steps of Kwon et al. 2022 on a copy of
a ViT or Point-MAE encoder and returns the smaller model with a
:class:`PruningReport`. The report's :meth:`~PruningReport.layout` (kept heads
and neurons per block) goes into config.json; :func:`shrink_to_layout` rebuilds
those shapes so that a saved pruned model loads.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from typing import Sequence

import torch
from torch import nn

from qcstream.models.pruning.masks import Masks, TransformerView, flops_fraction
from qcstream.models.pruning.search import collect_fisher, rearrange_mask, search_mask
from qcstream.models.pruning.structure import BiasOnly, prune_blocks
from qcstream.models.pruning.tuning import BranchFit, tune_masks

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class PruningReport:
    """Kept units of a pruned transformer, and the feature distortion left on the tuning frames."""

    flops_constraint: float
    flops: float
    #: Heads and neurons per block before pruning.
    unpruned_heads: int
    unpruned_neurons: int
    heads: list[list[int]]
    neurons: list[list[int]]
    distortion_masked: float
    distortion_tuned: float
    fits: list[BranchFit]

    def layout(self) -> dict:
        """Return the config.json entry: the counts that rebuild the shapes, and how the model was pruned."""
        return {
            "flops_constraint": self.flops_constraint,
            "flops": round(self.flops, 4),
            "unpruned": {"heads": self.unpruned_heads, "neurons": self.unpruned_neurons},
            "heads": [len(h) for h in self.heads],
            "neurons": [len(n) for n in self.neurons],
            "feature_distortion": {"masked": self.distortion_masked, "tuned": self.distortion_tuned},
            "solvers": [{"block": f.block, "branch": f.branch, "solver": f.solver, "held_out_loss": f.loss} for f in self.fits],
        }


@torch.no_grad()
def relative_distortion(view: TransformerView, masks: Masks, batches: Sequence, reference: list[torch.Tensor]) -> float:
    """``sum |f_masked - f|^2 / sum |f|^2`` over ``batches``, with ``masks`` attached."""
    error = total = 0.0
    with masks:
        for batch, original in zip(batches, reference):
            features = view.features(batch)
            error += float((features - original).pow(2).sum())
            total += float(original.pow(2).sum())
    return error / max(total, 1e-30)


def prune_transformer(
    model: nn.Module,
    feature_blocks: Sequence[int],
    batches: Sequence,
    flops: float,
    rearrange: bool = True,
    tune: bool = True,
    progress: bool = True,
) -> tuple[nn.Module, PruningReport]:
    """Return a pruned copy of ``model`` that fits ``flops`` of its prunable multiply-adds, and the report.

    ``batches`` are normal frames in the form :meth:`TransformerView.features`
    takes: image batches for a ViT, ``(neighborhoods, centers)`` for Point-MAE.
    They give the Fisher information and the mask tuning targets.
    """
    if not batches:
        raise ValueError("pruning needs normal frames: the training folder gave none")
    if is_pruned(model):
        raise ValueError("the transformer is already pruned; prune the unpruned model it came from")
    model = copy.deepcopy(model).eval()
    view = TransformerView(model, feature_blocks)

    fisher = collect_fisher(view, batches, total=len(batches), progress=progress)
    heads, neurons = search_mask(view, fisher, flops)
    if rearrange:
        heads = [rearrange_mask(mask, grads) for mask, grads in zip(heads, fisher.heads)]
        neurons = [rearrange_mask(mask, grads) for mask, grads in zip(neurons, fisher.neurons)]

    logger.info("Measuring the feature distortion of the binary mask on %d batches", len(batches))
    with torch.no_grad():
        reference = [view.features(batch) for batch in batches]
    masks = Masks(view)
    masks.set_binary(heads, neurons)
    masked = relative_distortion(view, masks, batches, reference)
    fits: list[BranchFit] = []
    if tune:
        heads, neurons, fits = tune_masks(view, heads, neurons, batches, progress=progress)
        masks.set_binary(heads, neurons)
    tuned = relative_distortion(view, masks, batches, reference)
    logger.info("Relative feature distortion on %d batches: %.4f with the binary mask, %.4f tuned", len(batches), masked, tuned)

    unpruned_heads, unpruned_neurons = view.num_heads[0], view.num_neurons[0]
    achieved = flops_fraction(view, [int(torch.count_nonzero(h)) for h in heads], [int(torch.count_nonzero(n)) for n in neurons])
    kept_heads, kept_neurons = _fold_and_remove(view, heads, neurons)
    report = PruningReport(
        flops_constraint=flops,
        flops=achieved,
        unpruned_heads=unpruned_heads,
        unpruned_neurons=unpruned_neurons,
        heads=kept_heads,
        neurons=kept_neurons,
        distortion_masked=masked,
        distortion_tuned=tuned,
        fits=fits,
    )
    return model, report


@torch.no_grad()
def _fold_and_remove(view: TransformerView, heads: Sequence[torch.Tensor], neurons: Sequence[torch.Tensor]) -> tuple[list[list[int]], list[list[int]]]:
    """Scale the output columns by the mask values, then cut the pruned units out of every block.

    Blocks after the last feature block never run; they are emptied.
    """
    head_dim = view.head_dim
    kept_heads: list[list[int]] = []
    kept_neurons: list[list[int]] = []
    for block, head_values, neuron_values in zip(view.blocks, heads, neurons):
        block.attn.proj.weight.mul_(head_values.repeat_interleave(head_dim)[None, :])
        block.mlp.fc2.weight.mul_(neuron_values[None, :])
        kept_heads.append([int(i) for i in torch.nonzero(head_values).flatten()])
        kept_neurons.append([int(i) for i in torch.nonzero(neuron_values).flatten()])
    unused = len(view.model.blocks) - len(view.blocks)
    prune_blocks(view.model.blocks, kept_heads + [[]] * unused, kept_neurons + [[]] * unused)
    return kept_heads + [[]] * unused, kept_neurons + [[]] * unused


def is_pruned(model: nn.Module) -> bool:
    """Tell whether ``model`` has a bias-only branch or blocks of different sizes, as only pruning leaves."""
    blocks = list(model.blocks)
    if any(isinstance(block.attn, BiasOnly) or isinstance(block.mlp, BiasOnly) for block in blocks):
        return True
    return len({block.attn.num_heads for block in blocks}) > 1 or len({block.mlp.fc1.out_features for block in blocks}) > 1


def shrink_to_layout(model: nn.Module, layout: dict) -> nn.Module:
    """Cut ``model``'s blocks, in place, to the head and neuron counts of a saved pruning ``layout``.

    The kept units are the first ones; the weights to load afterwards fill them.
    """
    heads, neurons = layout["heads"], layout["neurons"]
    if len(heads) != len(model.blocks) or len(neurons) != len(model.blocks):
        raise ValueError(f"the pruning layout has {len(heads)} blocks, the model {len(model.blocks)}: the model files do not match config.json")
    prune_blocks(model.blocks, [range(count) for count in heads], [range(count) for count in neurons])
    return model
