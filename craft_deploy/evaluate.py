"""Top-1/top-5 accuracy of a PyTorch model on a dataset, with a progress bar."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm


@torch.no_grad()
def evaluate(model: nn.Module, ds: Dataset, batch_size: int = 128, desc: str = "eval") -> dict[str, float]:
    """Accuracy (percent) and mean cross-entropy of `model` on `ds`, in eval mode."""
    model.eval()
    correct1 = correct5 = total = 0
    loss_sum = 0.0
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False)
    device = next(model.parameters()).device
    for x, y in tqdm(loader, desc=desc, leave=False, unit="batch", disable=None):
        logits = model(x.to(device)).float().cpu()
        loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum").item()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        correct1 += (top[:, 0] == y).sum().item()
        correct5 += (top == y[:, None]).any(dim=1).sum().item()
        total += len(y)
    return {
        "top1": 100.0 * correct1 / max(total, 1),
        "top5": 100.0 * correct5 / max(total, 1),
        "loss": loss_sum / max(total, 1),
        "samples": total,
    }
