"""Runs ``dinov2-train`` with test instrumentation that calls through to the shipped code (not a test module).

``python tests/train_driver.py [--hold-after-checkpoint K] --config CFG [key=value …]``
(also under ``torchrun``):

- every training step appends to ``{train.output_dir}/stream_rank{r}.jsonl`` one line: the stream
  position and a digest of the crops of each sample of the batch (what the step consumed);
- ``--hold-after-checkpoint K``: once ``ckpt_{K}`` is complete, the next step runs, then the process
  writes ``{train.output_dir}/holding`` and sleeps until it is killed — the test kills it on that file,
  never on timing, and the kill always lands mid-run with progress past the checkpoint.

:func:`stream_spy` is the same instrumentation for in-process tests (``monkeypatch`` it in).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import torch


def sample_digests(batch: dict) -> list[str]:
    """One digest per sample: its global crops and local crops (view-major rows ``v * B + b``)."""
    n_global = batch["global_crops"].shape[0]
    b = n_global // 2
    local = batch.get("local_crops")
    n_local = local.shape[0] // b if local is not None and local.numel() else 0
    digests = []
    for i in range(b):
        h = hashlib.sha1()
        for v in range(2):
            h.update(batch["global_crops"][v * b + i].contiguous().numpy().tobytes())
        for v in range(n_local):
            h.update(local[v * b + i].contiguous().numpy().tobytes())
        digests.append(h.hexdigest())
    return digests


def stream_spy(real_step, log: Path, after_step=None):
    """``train_step`` recording what each step consumed to ``log`` (jsonl), then calling ``real_step``."""

    def step(model, optimizer, batch, *args, **kwargs):
        record = {"positions": batch["positions"].tolist(), "digests": sample_digests(batch)}
        with open(log, "a") as f:
            f.write(json.dumps(record) + "\n")
        parts = real_step(model, optimizer, batch, *args, **kwargs)
        if after_step is not None:
            after_step()
        return parts

    return step


def read_stream(run: Path) -> list[tuple[int, str]]:
    """(position, digest) of every sample consumed by every rank of ``run``, in stream order."""
    samples = []
    for log in sorted(run.glob("stream_rank*.jsonl")):
        for line in log.read_text().splitlines():
            record = json.loads(line)
            samples.extend(zip(record["positions"], record["digests"], strict=True))
    return sorted(samples)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hold-after-checkpoint", type=int, default=None)
    ours, rest = parser.parse_known_args(argv)

    from dinov2.config import load_config
    from dinov2.launch import train_cli as cli
    from dinov2.train import trainer

    overrides = cli.parse_args(rest)
    cfg = load_config(overrides.config, overrides.overrides)
    out = Path(cfg.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rank = int(os.environ.get("RANK", "0"))
    steps = 0

    def after_step() -> None:
        nonlocal steps
        steps += 1
        hold = ours.hold_after_checkpoint
        if hold is not None and (out / "checkpoints" / f"ckpt_{hold:08d}" / ".metadata").is_file():
            (out / "holding").write_text(str(steps))
            while True:  # killed here by the test
                time.sleep(1)

    trainer.train_step = stream_spy(trainer.train_step, out / f"stream_rank{rank}.jsonl", after_step)
    return cli.main(rest)


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    sys.exit(main(sys.argv[1:]))
