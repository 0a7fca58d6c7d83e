"""The training loss: summed next-token cross-entropy over the supervised positions."""

from __future__ import annotations

from typing import Any


def token_loss_sum(logits: Any, labels: Any, head_index: Any = None) -> Any:
    """Summed next-token cross-entropy over the supervised positions (labels are unshifted).
    With modality heads (`head_index`, see lumo_core.lm.heads) each target's softmax runs
    over its own head's ids only."""
    import torch.nn.functional as F

    from lumo_core.lm.heads import restrict_to_target_heads
    from lumo_core.uti.sequences import IGNORE_INDEX

    # Shifting the labels left (not the logits right) avoids copying the logits.
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    logits = restrict_to_target_heads(logits.float(), targets, head_index)
    return F.cross_entropy(
        logits.view(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
