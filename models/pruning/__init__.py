"""Post-training structured pruning of the transformers (attention heads and MLP neurons)."""

from qcstream.models.pruning.structure import BiasOnly, prune_attention_heads, prune_blocks, prune_mlp_neurons

__all__ = ["BiasOnly", "prune_attention_heads", "prune_blocks", "prune_mlp_neurons"]
