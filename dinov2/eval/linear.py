"""Linear probe on frozen, precomputed features, with a learning-rate sweep done in one pass.

Protocol (:func:`linear_probe`):

1. Hold out a stratified, seeded ``val_fraction`` of the train features as a validation split.
2. Standardize features with the mean/std of the training part (optional, on by default: it makes
   one learning-rate grid fit features of any scale).
3. Train one linear classifier per learning rate, all at once: the heads' weights are stacked so a
   batch is scored by every head with one ``einsum``, and each head is its own SGD parameter group
   with its own learning rate (momentum 0.9, cosine decay per step, cross-entropy summed over
   heads, so the heads' gradients do not interact). Every head starts from the same weights and
   sees the same shuffled batches, so a head trained in the sweep is the head trained alone.
4. Pick the learning rate with the best validation accuracy (ties: the smaller learning rate).
5. With ``refit=True`` (default) retrain that learning rate's head on the whole train set;
   otherwise reuse the head trained without the validation split. Report test accuracy.

Everything random (split, initialization, batch order) derives from ``seed``: same inputs, same
numbers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DEFAULT_LRS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)


def stratified_split(labels: Tensor, val_fraction: float, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``(train_idx, val_idx)``: ``round(val_fraction * n_c)`` random samples of each class ``c`` for val.

    Every class keeps at least one training sample; classes with one sample give none to val.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    g = torch.Generator().manual_seed(seed)
    labels = labels.cpu()
    train_parts, val_parts = [], []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_val = min(round(val_fraction * len(idx)), len(idx) - 1)
        val_parts.append(idx[:n_val])
        train_parts.append(idx[n_val:])
    return torch.cat(train_parts).sort().values, torch.cat(val_parts).sort().values


class LinearHeads(nn.Module):
    """``L`` independent linear classifiers ``D → C`` evaluated together: ``(N, D) → (L, N, C)``.

    Each head's weight and bias are separate parameters (so each can have its own optimizer
    parameter group); the forward stacks them into one batched product. All heads start from the
    same weights (normal, std 0.01; zero bias), so they differ only by what training does to them.
    """

    def __init__(self, num_heads: int, dim: int, num_classes: int, generator: torch.Generator | None = None):
        super().__init__()
        init = torch.randn(dim, num_classes, generator=generator) * 0.01
        self.weights = nn.ParameterList(nn.Parameter(init.clone()) for _ in range(num_heads))
        self.biases = nn.ParameterList(nn.Parameter(torch.zeros(num_classes)) for _ in range(num_heads))

    def forward(self, x: Tensor) -> Tensor:
        w = torch.stack(list(self.weights))  # (L, D, C)
        b = torch.stack(list(self.biases))  # (L, C)
        return torch.einsum("nd,ldc->lnc", x, w) + b[:, None, :]

    def head_params(self, i: int) -> list[nn.Parameter]:
        return [self.weights[i], self.biases[i]]


def train_linear_heads(
    feats: Tensor,
    labels: Tensor,
    lrs: Sequence[float],
    num_classes: int,
    *,
    epochs: int = 10,
    batch_size: int = 256,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    seed: int = 0,
) -> LinearHeads:
    """One linear head per learning rate in ``lrs``, trained jointly (SGD + momentum, cosine decay)."""
    heads = LinearHeads(len(lrs), feats.shape[1], num_classes, torch.Generator().manual_seed(seed)).to(feats.device)
    g = torch.Generator().manual_seed(seed + 1)  # batch order
    optimizer = torch.optim.SGD(
        [{"params": heads.head_params(i), "lr": lr} for i, lr in enumerate(lrs)],
        momentum=momentum,
        weight_decay=weight_decay,
    )
    n = feats.shape[0]
    steps_per_epoch = math.ceil(n / batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(epochs * steps_per_epoch, 1))
    labels = labels.to(feats.device)
    for _ in range(epochs):
        order = torch.randperm(n, generator=g).to(feats.device)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            logits = heads(feats[idx])  # (L, B, C)
            target = labels[idx].repeat(len(lrs))
            loss = F.cross_entropy(logits.flatten(0, 1), target, reduction="sum") / len(idx)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return heads


@torch.no_grad()
def head_accuracies(heads: LinearHeads, feats: Tensor, labels: Tensor, batch_size: int = 4096) -> list[float]:
    """Top-1 accuracy in % of every head on ``(feats, labels)``."""
    correct = torch.zeros(len(heads.weights), dtype=torch.int64)
    labels = labels.to(feats.device)
    for start in range(0, feats.shape[0], batch_size):
        pred = heads(feats[start : start + batch_size]).argmax(dim=-1)  # (L, B)
        correct += (pred == labels[start : start + batch_size]).sum(dim=1).cpu()
    return (100.0 * correct.double() / max(feats.shape[0], 1)).tolist()


def _standardizer(feats: Tensor) -> tuple[Tensor, Tensor]:
    mean = feats.mean(dim=0)
    std = feats.std(dim=0, unbiased=False).clamp_min(1e-6)
    return mean, std


def linear_probe(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    test_labels: Tensor,
    *,
    lrs: Sequence[float] = DEFAULT_LRS,
    val_fraction: float = 0.1,
    standardize: bool = True,
    refit: bool = True,
    num_classes: int | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    **head_options: Any,
) -> dict[str, Any]:
    """Sweep ``lrs`` on a validation split, report the chosen head's test accuracy (see module doc).

    ``head_options`` are :func:`train_linear_heads`'s (``epochs``, ``batch_size``, ``momentum``,
    ``weight_decay``); ``seed`` draws both the validation split and the heads.

    Returns ``{"best_lr": float, "val_acc": {lr: %}, "test_acc": %, "num_train": int, "num_val": int}``
    (``num_train``: samples the swept heads were trained on).
    """
    if not lrs:
        raise ValueError("need at least one learning rate")
    if train_feats.shape[0] != train_labels.shape[0] or test_feats.shape[0] != test_labels.shape[0]:
        raise ValueError("features and labels differ in length")
    device = torch.device(device) if device is not None else train_feats.device
    x = train_feats.to(device, torch.float32)
    y = train_labels.to(device, torch.int64)
    x_test = test_feats.to(device, torch.float32)
    y_test = test_labels.to(device, torch.int64)
    if int(y.min()) < 0:
        raise ValueError("the linear probe needs labelled train data (found negative labels)")
    num_classes = num_classes if num_classes is not None else int(torch.cat([y, y_test]).max()) + 1
    fit_idx, val_idx = (t.to(device) for t in stratified_split(y, val_fraction, seed))
    if len(val_idx) == 0:
        raise ValueError("the validation split is empty; use more train data or a larger val_fraction")
    common = dict(seed=seed, **head_options)

    def prepared(reference: Tensor, *parts: Tensor) -> list[Tensor]:
        if not standardize:
            return list(parts)
        mean, std = _standardizer(reference)
        return [(p - mean) / std for p in parts]

    x_fit, x_val, x_test_fit = prepared(x[fit_idx], x[fit_idx], x[val_idx], x_test)
    heads = train_linear_heads(x_fit, y[fit_idx], lrs, num_classes, **common)
    val_acc = head_accuracies(heads, x_val, y[val_idx])
    best = max(range(len(lrs)), key=lambda i: (val_acc[i], -lrs[i]))
    if refit:
        x_all, x_test_all = prepared(x, x, x_test)
        final = train_linear_heads(x_all, y, [lrs[best]], num_classes, **common)
        test_acc = head_accuracies(final, x_test_all, y_test)[0]
    else:
        test_acc = head_accuracies(heads, x_test_fit, y_test)[best]
    return {
        "best_lr": float(lrs[best]),
        "val_acc": {float(lr): acc for lr, acc in zip(lrs, val_acc)},
        "test_acc": test_acc,
        "num_train": len(fit_idx),
        "num_val": len(val_idx),
    }
