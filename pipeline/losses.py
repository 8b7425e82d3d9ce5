"""Noisy Student targets and loss, in plain PyTorch (no Ray), so tests and the train loop share them.

The student's loss is the official one: cross-entropy on the labeled batch (label smoothing 0.1) plus
``unlabel_ratio`` times the cross-entropy against the teacher's distribution on the pseudo-labeled
batch. Pseudo-labels are stored as the teacher's top-k (index, probability) pairs, so they are
expanded to dense targets here, optionally sharpened with a temperature, or made hard (one-hot).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["dense_targets", "noisy_student_loss", "soft_cross_entropy"]


def dense_targets(
    topk_index: torch.Tensor,
    topk_prob: torch.Tensor,
    num_classes: int,
    temperature: float = 1.0,
) -> torch.Tensor:
    """(B, k) teacher top-k indices and probabilities -> (B, C) float32 target distribution.

    ``temperature > 0``: ``p ** (1 / T)`` renormalised over the top-k (T = 1 renormalises the
    teacher's own probabilities, whose top-k mass is below 1; T < 1 sharpens, T > 1 flattens).
    ``temperature <= 0``: hard one-hot of the teacher's argmax (the official code's
    ``teacher_softmax_temp=-1``).
    """
    if topk_index.shape != topk_prob.shape or topk_index.ndim != 2:
        raise ValueError(
            f"topk_index and topk_prob must both be (B, k); got {tuple(topk_index.shape)} "
            f"and {tuple(topk_prob.shape)}."
        )
    index = topk_index.long()
    # Parquet stores probabilities as float16; sharpening them in float16 would underflow.
    prob = topk_prob.float()
    out = torch.zeros(index.shape[0], num_classes, dtype=torch.float32, device=index.device)
    if temperature <= 0:
        best = prob.argmax(dim=1, keepdim=True)  # (B, 1)
        return out.scatter_(1, index.gather(1, best), 1.0)
    # softmax(log p / T) is p^(1/T) / sum p^(1/T), without underflow for small T; p = 0 stays 0.
    weights = torch.softmax(torch.log(prob) / temperature, dim=1)  # (B, k)
    # scatter_add, not scatter: a repeated index (padding) must add its mass, not overwrite it.
    return out.scatter_add_(1, index, weights)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ``-sum_c targets * log_softmax(logits)``; 0 for an empty batch.

    (B, C) logits and (B, C) target distributions. Computed in float32 even for bf16/fp16 logits,
    because log-softmax in half precision loses the small probabilities that soft targets carry.
    """
    if logits.shape != targets.shape:
        raise ValueError(
            f"logits and targets must have the same (B, C) shape; got {tuple(logits.shape)} "
            f"and {tuple(targets.shape)}."
        )
    if logits.shape[0] == 0:
        # A mean over nothing is NaN; zero (still attached to the graph) keeps training going.
        return logits.float().sum() * 0.0
    log_prob = F.log_softmax(logits.float(), dim=-1)
    return -(targets.float() * log_prob).sum(dim=-1).mean()


def noisy_student_loss(
    labeled_logits: torch.Tensor,
    labels: torch.Tensor,
    pseudo_logits: torch.Tensor,
    pseudo_targets: torch.Tensor,
    *,
    unlabel_ratio: float = 1.0,
    label_smoothing: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Labeled CE (label smoothing) + ``unlabel_ratio`` x soft CE on the pseudo-labeled batch.

    Each term is a mean over its own batch, so the pseudo term's weight is ``unlabel_ratio`` whatever
    the two batch sizes (the ratio also sets how many pseudo-labeled samples come per labeled one).
    An empty pseudo batch contributes 0. Returns (loss, labeled loss, pseudo loss) as tensors,
    nothing read back to the host: the training loop sums them on the device.
    """
    labeled_loss = F.cross_entropy(
        labeled_logits.float(), labels.long(), label_smoothing=label_smoothing
    )
    pseudo_loss = soft_cross_entropy(pseudo_logits, pseudo_targets)
    return labeled_loss + unlabel_ratio * pseudo_loss, labeled_loss, pseudo_loss
