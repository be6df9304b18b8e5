"""Supervised contrastive loss (Khosla et al. 2020, "SupCon", the L_out form)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def supcon_loss(embeddings: torch.Tensor, labels: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Mean over anchors i of  -1/|P(i)| * sum_{p in P(i)} log( exp(z_i.z_p/t) / sum_{a != i} exp(z_i.z_a/t) ).

    embeddings: (N, D); they are L2-normalised here (a no-op for `SupConModel.embed` output).
    labels: (N,) class indices. P(i) are the other samples with the label of i. For several
    augmented views per image, concatenate the views along N and repeat the labels.
    Anchors without a positive in the batch are left out of the mean; a batch with no positive
    pair at all gives 0 (still attached to the graph so `backward()` works).
    """
    if embeddings.ndim != 2 or labels.ndim != 1 or labels.shape[0] != embeddings.shape[0]:
        raise ValueError(
            f"supcon_loss expects embeddings (N, D) and labels (N,), got {tuple(embeddings.shape)} "
            f"and {tuple(labels.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"supcon_loss temperature must be > 0, got {temperature}")
    z = F.normalize(embeddings, dim=1)
    logits = z @ z.T / temperature
    self_mask = torch.eye(len(z), dtype=torch.bool, device=z.device)
    # the denominator runs over every other sample, never the anchor itself
    log_prob = logits - torch.logsumexp(logits.masked_fill(self_mask, float("-inf")), dim=1, keepdim=True)
    positives = (labels[:, None] == labels[None, :]) & ~self_mask
    counts = positives.sum(dim=1)
    has_positive = counts > 0
    if not has_positive.any():
        return embeddings.sum() * 0.0
    mean_log_prob_pos = (log_prob * positives).sum(dim=1)[has_positive] / counts[has_positive]
    return -mean_log_prob_pos.mean()
