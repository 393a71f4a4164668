"""Post-training structured pruning of the transformers (attention heads and MLP neurons)."""

from qcstream.models.pruning.prune import PruningReport, is_pruned, prune_transformer, shrink_to_layout
from qcstream.models.pruning.structure import BiasOnly, prune_attention_heads, prune_blocks, prune_mlp_neurons

__all__ = [
    "BiasOnly",
    "PruningReport",
    "is_pruned",
    "prune_attention_heads",
    "prune_blocks",
    "prune_mlp_neurons",
    "prune_transformer",
    "shrink_to_layout",
]
