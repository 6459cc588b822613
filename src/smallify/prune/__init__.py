"""Pruning: structured channel pruning (graph.py, channel.py) and unstructured / N:M magnitude pruning
(magnitude.py)."""
from smallify.prune.channel import ChannelPrune, prune
from smallify.prune.transformer import AttentionPrune, prune_attention
from smallify.prune.magnitude import Unstructured, finalize, prune_gradually, sparsify, sparsity_of

__all__ = ["AttentionPrune", "prune_attention", "ChannelPrune", "prune", "Unstructured", "sparsify", "prune_gradually", "finalize", "sparsity_of"]
