"""A "checkpoint and stop" request that a signal handler can raise and every rank acts on together.

A signal (SLURM's warning before a time limit, a preemption, ``scontrol requeue``, Ctrl-C) reaches
the ranks at different moments, or only some of them. The handler only sets a flag
(:meth:`StopRequest.request`, safe inside a signal handler: one attribute assignment, no lock).
The training loop asks :meth:`StopRequest.agreed` after each iteration; the ranks all-reduce their
flags (MAX), so all of them see the same answer at the same iteration, save one checkpoint together
and leave the loop.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist

from dinov2.distributed.comm import world_size


class StopRequest:
    """Set from anywhere (signal handler, thread, test); read collectively by the training loop.

    ``check_every``: iterations between collective checks (each is a tiny all-reduce, and on GPU a
    host sync); 1 reacts within one iteration.
    """

    def __init__(self, check_every: int = 1) -> None:
        if check_every < 1:
            raise ValueError(f"check_every must be >= 1, got {check_every}")
        self.check_every = check_every
        self.requested = False
        self.reason = ""
        self.signum: int | None = None

    def request(self, reason: str = "requested", signum: int | None = None) -> None:
        """Ask the training loop to checkpoint and stop at the next check. Signal-safe."""
        if not self.requested:  # the first reason wins
            self.reason = reason
            self.signum = signum
        self.requested = True

    def agreed(self, iteration: int, device: torch.device | str = "cpu") -> bool:
        """True on every rank when any rank has a request; call on all ranks after ``iteration``."""
        if iteration % self.check_every:
            return False
        if world_size() == 1:
            return self.requested
        flag = torch.tensor([1 if self.requested else 0], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        anyone = bool(flag.item())
        if anyone and not self.requested:
            self.request("another rank asked to stop")
        return anyone

    def _handler(self, signum, frame) -> None:  # noqa: ARG002 — the signal module's signature
        self.request(f"signal {signal.Signals(signum).name}", signum)

    @contextlib.contextmanager
    def handling(self, signals: Iterable[int | signal.Signals]) -> Iterator[StopRequest]:
        """Within the block, ``signals`` set this request instead of their previous handlers, which
        are restored afterwards (main thread only, as for any Python signal handler)."""
        previous = {}
        try:
            for sig in signals:
                previous[sig] = signal.signal(sig, self._handler)
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
