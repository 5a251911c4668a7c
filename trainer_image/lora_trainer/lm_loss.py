"""A causal LM's cross-entropy without its full logits: the output layer and the loss, a chunk of tokens at a time.

The logits of long sequences dwarf what else a LoRA step keeps: tokens x vocabulary x 4 bytes, e.g. 8
sequences of 4096 tokens over a 128k vocabulary are 16 GiB in fp32, and autograd keeps them for the backward
pass. Here only the positions that carry a label go through the output layer, CHUNK_TOKENS at a time, each
chunk under activation checkpointing: the forward pass keeps no logits and the backward pass recomputes one
chunk's at a time. liger-kernel's fused linear cross-entropy does this in Triton (GPUs only) and
cut-cross-entropy's non-Triton path multiplies out the whole logits; this one is plain torch and runs anywhere.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# one chunk's fp32 logits over a 128k vocabulary are 512 MiB: small beside an 8B model, large enough that
# the output layer's matmul stays efficient
CHUNK_TOKENS = 1024
IGNORE_INDEX = -100  # torch's and transformers' label of tokens that carry no loss


def causal_lm_loss(
    hidden: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    labels: torch.Tensor,
    chunk_tokens: int = CHUNK_TOKENS,
) -> torch.Tensor:
    """The mean next-token cross-entropy over the trained labels, as transformers' ForCausalLMLoss computes
    it from full logits. hidden (B, T, H) are the decoder's last states, head the output layer."""
    targets = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]  # (B, T): position t predicts label t+1
    keep = targets != IGNORE_INDEX
    states, targets = hidden[keep], targets[keep]  # (N, H), (N,)
    if targets.numel() == 0:  # nothing trained in this batch: a zero that still backpropagates
        return hidden.sum() * 0.0
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, targets.numel(), chunk_tokens):
        end = start + chunk_tokens
        total = total + checkpoint(
            partial(_chunk_loss, head), states[start:end], targets[start:end], use_reentrant=False
        )
    return total / targets.numel()


def _chunk_loss(head: Callable[[torch.Tensor], torch.Tensor], states: torch.Tensor, targets: torch.Tensor):
    return F.cross_entropy(head(states).float(), targets, reduction="sum")  # (n, V) logits, freed on return
