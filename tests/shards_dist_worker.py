"""torchrun worker for tests/test_shards.py (not a test module).

``torchrun --nproc-per-node W tests/shards_dist_worker.py RECORD_DIR [key=value …]`` runs the ordinary
``train()`` (FSDP2 over gloo) and writes, per rank, what its loader handed to the training loop:
``RECORD_DIR/rank{r}.json`` = ``[[stream positions], [labels]]`` per batch. The loader is the real one
(``dinov2.train.trainer.build_loader``); it is only wrapped to note each batch on its way through.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import dinov2.train.trainer as trainer
from dinov2.config import load_config
from dinov2.launch.run import train


class RecordingBatches:
    """Iterates a DataLoader unchanged, appending each batch's positions and labels to ``seen``."""

    def __init__(self, dataloader, seen: list):
        self.dataloader, self.dataset, self.seen = dataloader, dataloader.dataset, seen

    def __iter__(self):
        for batch in self.dataloader:
            self.seen.append([batch["positions"].tolist(), batch["labels"].tolist()])
            yield batch


def main() -> None:
    record, *overrides = sys.argv[1:]
    seen: list = []
    build_loader = trainer.build_loader

    def recording_build_loader(*args, **kwargs):
        loader = build_loader(*args, **kwargs)
        loader.dataloader = RecordingBatches(loader.dataloader, seen)
        return loader

    trainer.build_loader = recording_build_loader
    train(load_config("train/demo", overrides))
    Path(record).mkdir(parents=True, exist_ok=True)
    (Path(record) / f"rank{os.environ['RANK']}.json").write_text(json.dumps(seen))


if __name__ == "__main__":
    main()
