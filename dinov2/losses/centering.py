"""Turning teacher logits into target distributions: softmax centering or Sinkhorn-Knopp.

Both DINO (CLS) and iBOT (masked patches) targets come from the teacher head's logits. Two
recipes are supported by one module, :class:`Centering`:

* ``"softmax"``: subtract an exponential-moving-average centre, then a sharp softmax. The centre
  is updated *separately* (:meth:`Centering.update`), so the trainer can compute this step's
  targets with the previous step's centre and then fold the current batch in, as DINO does.
* ``"sinkhorn_knopp"``: a few Sinkhorn-Knopp iterations that spread the batch evenly over the
  prototypes (equipartition), with the row/column sums all-reduced so that the whole global batch
  is balanced, not each rank's slice separately. No state.

Rows of ``teacher_logits`` at index ``>= n_valid`` are padding (iBOT pads the masked-patch rows to
a fixed size): they are left out of every sum and come back as all-zero target rows.
"""


from typing import get_args

import torch
from torch import nn

from dinov2.config import Centering as CenteringMode
from dinov2.distributed.comm import all_reduce_max_, all_reduce_sum_

_MODES = get_args(CenteringMode)
# Smallest positive normal float32: used to make 0 / 0 come out as 0 for empty (padding) rows.
_TINY = torch.finfo(torch.float32).tiny


def _row_mask(n_rows: int, n_valid: int | torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """Boolean (n_rows,) mask of the real rows, or None when every row is real."""
    if n_valid is None:
        return None
    if isinstance(n_valid, torch.Tensor):
        # A 0-d tensor may live on any device; comparing does not synchronize with the host.
        n_valid = n_valid.reshape(())
    return torch.arange(n_rows, device=device) < n_valid


def _row_count(n_rows: int, mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """Number of real rows as a float32 scalar tensor on ``like``'s device."""
    if mask is None:
        return like.new_tensor(float(n_rows), dtype=torch.float32)
    return mask.sum(dtype=torch.float32)


class Centering(nn.Module):
    """Teacher logits -> target probabilities, by softmax centering or Sinkhorn-Knopp.

    Args:
        out_dim: number of prototypes K (last dimension of the logits).
        mode: ``"sinkhorn_knopp"`` (default) or ``"softmax"``.
        momentum: EMA momentum of the centre (softmax mode only):
            ``center = momentum * center + (1 - momentum) * batch_mean``.
        sk_iterations: number of Sinkhorn-Knopp iterations (sinkhorn_knopp mode only).

    In softmax mode the module holds a persistent buffer ``center`` of shape (1, out_dim), float32,
    identical on every rank (its update is all-reduced). In Sinkhorn-Knopp mode it has no state.

    Inputs may have any leading shape ``(..., out_dim)``; they are treated as rows of a
    ``(-1, out_dim)`` matrix (so a ``(2, B, K)`` tensor of two views is balanced as ``2B`` rows)
    and the output has the input's shape, in float32. Everything runs without autograd.
    """

    center: torch.Tensor

    def __init__(
        self,
        out_dim: int,
        mode: CenteringMode = "sinkhorn_knopp",
        momentum: float = 0.9,
        sk_iterations: int = 3,
    ) -> None:
        super().__init__()
        if mode not in _MODES:
            raise ValueError(f"unknown centering mode {mode!r}; expected one of {_MODES}")
        if out_dim < 1:
            raise ValueError(f"out_dim must be positive, got {out_dim}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        if sk_iterations < 1:
            raise ValueError(f"sk_iterations must be >= 1, got {sk_iterations}")
        self.out_dim = out_dim
        self.mode = mode
        self.momentum = momentum
        self.sk_iterations = sk_iterations
        if mode == "softmax":
            self.register_buffer("center", torch.zeros(1, out_dim, dtype=torch.float32))

    def extra_repr(self) -> str:
        if self.mode == "softmax":
            return f"out_dim={self.out_dim}, mode={self.mode}, momentum={self.momentum}"
        return f"out_dim={self.out_dim}, mode={self.mode}, sk_iterations={self.sk_iterations}"

    def _as_rows(self, teacher_logits: torch.Tensor) -> torch.Tensor:
        if teacher_logits.shape[-1] != self.out_dim:
            raise ValueError(f"expected logits with last dim {self.out_dim}, got {tuple(teacher_logits.shape)}")
        return teacher_logits.reshape(-1, self.out_dim)

    @torch.no_grad()
    def forward(
        self,
        teacher_logits: torch.Tensor,
        teacher_temp: float,
        n_valid: int | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Target probabilities for ``teacher_logits`` at temperature ``teacher_temp``.

        ``n_valid`` (int or 0-d tensor, optional) is the number of real rows on this rank; the
        remaining rows are padding, excluded from all sums and returned as zeros.
        In softmax mode this does *not* update the centre: call :meth:`update` afterwards.
        """
        rows = self._as_rows(teacher_logits)
        mask = _row_mask(rows.shape[0], n_valid, rows.device)
        if self.mode == "softmax":
            probs = self._softmax_centered(rows, teacher_temp)
            if mask is not None:
                probs.masked_fill_(~mask.unsqueeze(1), 0.0)
        else:
            probs = self._sinkhorn_knopp(rows, teacher_temp, mask)
        return probs.reshape(teacher_logits.shape)

    def _softmax_centered(self, rows: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        return torch.softmax((rows.float() - self.center) / teacher_temp, dim=-1)

    def _sinkhorn_knopp(self, rows: torch.Tensor, teacher_temp: float, mask: torch.Tensor | None) -> torch.Tensor:
        # Work on the (B, K) layout directly: "prototype sums" are over dim 0 (all-reduced across
        # ranks), "sample sums" over dim 1 (local). This is the usual K x B formulation transposed.
        n_rows, n_protos = rows.shape
        scores = rows.float() / teacher_temp
        if mask is not None:
            scores = scores.masked_fill(~mask.unsqueeze(1), float("-inf"))  # padding -> exp() = 0
        # Subtract one *global* constant before exp() for overflow safety: it scales every entry
        # equally, so it cancels exactly in the first normalization below.
        shift = scores.amax() if n_rows > 0 else scores.new_tensor(float("-inf"))
        all_reduce_max_(shift)
        shift = torch.where(torch.isneginf(shift), torch.zeros_like(shift), shift)  # no real row anywhere
        q = torch.exp_(scores - shift)

        # Total mass and global row count in one collective.
        stats = torch.stack([q.sum(), _row_count(n_rows, mask, q)])
        all_reduce_sum_(stats)
        total, n_global = stats[0], stats[1].clamp_min(1.0)
        q.div_(total.clamp_min(_TINY))

        for _ in range(self.sk_iterations):
            # Each prototype gets total mass 1 / K over the global batch.
            proto_mass = q.sum(dim=0, keepdim=True)
            all_reduce_sum_(proto_mass)
            q.div_(proto_mass.clamp_min(_TINY).mul_(n_protos))
            # Each sample gets mass 1 / B_global.
            sample_mass = q.sum(dim=1, keepdim=True)
            q.div_(sample_mass.clamp_min(_TINY).mul_(n_global))
        # Rescale so every real sample's distribution sums to 1.
        return q.mul_(n_global)

    @torch.no_grad()
    def update(self, teacher_logits: torch.Tensor, n_valid: int | torch.Tensor | None = None) -> None:
        """Fold the batch mean of ``teacher_logits`` into the EMA centre; a no-op under Sinkhorn-Knopp,
        which keeps no state (so a caller need not ask which mode it has).

        The mean is over all real rows of all ranks (sums and counts are all-reduced), so the
        centre stays identical everywhere. Rows ``>= n_valid`` are ignored. If there is no real
        row anywhere, the centre is left unchanged.
        """
        if self.mode != "softmax":
            return
        rows = self._as_rows(teacher_logits).float()
        mask = _row_mask(rows.shape[0], n_valid, rows.device)
        if mask is not None:
            rows = rows.masked_fill(~mask.unsqueeze(1), 0.0)
        # Per-prototype sums plus the row count, reduced in one collective.
        stats = torch.cat([rows.sum(dim=0), _row_count(rows.shape[0], mask, rows).reshape(1)])
        all_reduce_sum_(stats)
        count = stats[-1]
        batch_mean = (stats[:-1] / count.clamp_min(1.0)).unsqueeze(0)
        new_center = self.center * self.momentum + batch_mean * (1.0 - self.momentum)
        self.center.copy_(torch.where(count > 0, new_center, self.center))
