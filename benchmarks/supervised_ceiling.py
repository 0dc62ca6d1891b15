"""What a fixed number of training steps can buy: k-NN of the randomly initialised backbone, of our
self-supervised trainer, and of the same backbone trained *with labels* on the same batches.

The supervised row is a ceiling for the self-supervised one: labels are the strongest signal a
backbone can get, so when the supervised backbone, after the same steps on the same augmented batches,
is not far above the random one, no self-supervised recipe of that size and length will be either. By
default it runs the test suite's CPU-minutes recipe (``tests/configs/cifar10_small_cpu.yaml``: a D=96,
depth-4 ViT, 250 iterations of 128 cifar10-small images), whose "well above random init" check this
calibrates (``tests/test_learning.py``, docs/BENCHMARKS.md).

* random init: the backbone as built from ``train.seed``;
* self-supervised: ``dinov2.launch.run.train`` on the config (its EMA teacher is evaluated);
* supervised: a fresh backbone (same seed) + a linear classifier on the CLS token, cross-entropy on the
  first global crop of every image of the trainer's batches (``data.pipeline`` of the config, same
  stream), AdamW (``--lr``, ``--weight-decay``) with the config's warm-up iterations then cosine to 0,
  for the same number of iterations.

Every row is evaluated by ``dinov2.train.final_eval.knn_of_backbone`` (the final k-NN of a training
run: weighted k-NN of the CLS token, train split as memory bank, ``eval.test_split`` as queries).

    python benchmarks/supervised_ceiling.py                       # ~9 minutes on 2 CPU cores
    python benchmarks/supervised_ceiling.py --markdown docs/BENCHMARKS.md
    python benchmarks/supervised_ceiling.py --tiny                # CI: tiny ViT, a few steps, ~30 s
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

if __name__ == "__main__" and not __package__:  # run as a file: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.devices import resolve_device, run_header  # noqa: E402
from benchmarks.tables import format_table, header_lines, update_markdown  # noqa: E402
from dinov2.config import load_config  # noqa: E402
from dinov2.distributed.env import DistEnv  # noqa: E402
from dinov2.models import build_backbone  # noqa: E402
from dinov2.train.final_eval import knn_of_backbone  # noqa: E402
from dinov2.train.schedules import Schedules, warmup_cosine  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path(os.environ.get("DINOV2_SHARED_DATA", REPO.parent / "shared" / "data"))
DEFAULT_CONFIG = REPO / "tests" / "configs" / "cifar10_small_cpu.yaml"
TINY = [  # seconds on a CPU core
    "model.embed_dim=24",
    "model.depth=2",
    "model.num_heads=2",
    "dino_head.out_dim=64",
    "dino_head.hidden_dim=64",
    "dino_head.bottleneck_dim=16",
    "data.batch_size_per_gpu=32",
    "train.max_iterations=6",
    "optim.epoch_length=3",
    "eval.knn_k=[10]",
]
TINY_TRAIN, TINY_TEST = 400, 200  # images of the cifar10-small splits kept in --tiny mode
COLUMNS = ["training", "labels", "iterations", "batch", "train s", "k-NN top-1", "vs random init"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", default=str(DEFAULT_DATA), help="folder holding cifar10/ and cifar10-small/")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="training config (default: the CPU fixture's)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    p.add_argument("--lr", type=float, default=1e-3, help="supervised AdamW peak learning rate")
    p.add_argument("--weight-decay", type=float, default=0.05, help="supervised AdamW weight decay")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--tiny", action="store_true", help=f"CI mode: tiny ViT, {TINY_TRAIN}/{TINY_TEST} images")
    p.add_argument("--output-dir", default="outputs/bench_supervised_ceiling", help="the self-supervised run goes here")
    p.add_argument("--markdown", default=None, help="write/update the table in this markdown file")
    p.add_argument("overrides", nargs="*", help="extra config overrides key=value")
    return p.parse_args(argv)


def tiny_subsets(data: Path, out: Path) -> str:
    """Class-balanced subsets of the (class-sorted) cifar10-small index files, as a ``{split}`` pattern."""
    out.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", TINY_TRAIN), ("test", TINY_TEST)):
        index = np.load(data / "cifar10-small" / f"{split}_idx.npy")
        np.save(out / f"{split}_idx.npy", index[:: len(index) // count][:count])  # every class equally
    return str(out / "{split}_idx.npy")


def supervised(cfg: Any, device: torch.device, lr: float, weight_decay: float, num_classes: int) -> torch.nn.Module:
    """A fresh backbone + linear CLS classifier trained on the trainer's batches (first global crops)."""
    from dinov2.train.trainer import build_loader, total_iterations  # lazy: the trainer adds ~0.9 s (FSDP) to --help

    torch.manual_seed(cfg.train.seed)
    backbone = build_backbone(cfg.model).to(device)
    head = torch.nn.Linear(backbone.embed_dim, num_classes).to(device)
    params = list(backbone.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    total = total_iterations(cfg)
    warmup = Schedules.from_config(cfg, cfg.data.batch_size_per_gpu, total).warmup_iterations
    batches = iter(build_loader(cfg, DistEnv(), device, 0))
    backbone.train()
    for it in range(total):
        for group in optimizer.param_groups:
            group["lr"] = warmup_cosine(it, total, lr, 0.0, warmup)
        batch = next(batches)
        labels = batch["labels"].to(device)
        images = batch["global_crops"][: labels.shape[0]].to(device)  # view-major: every image's first crop
        loss = F.cross_entropy(head(backbone(images)["cls"]), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return backbone


def run(args: argparse.Namespace) -> dict[str, Any]:
    from dinov2.launch.run import train  # lazy: the trainer adds ~0.9 s (FSDP) to --help
    from dinov2.train.trainer import total_iterations

    data, out = Path(args.data), Path(args.output_dir)
    subsets = tiny_subsets(data, out / "subsets") if args.tiny else str(data / "cifar10-small" / "{split}_idx.npy")
    overrides = [
        f"data.dataset.path={data / 'cifar10'}",
        f"data.dataset.subset_path={subsets}",
        f"train.output_dir={out / 'ssl'}",
        "train.progress=false",
        "eval.final_knn=true",
        f"train.device={args.device}",
        *(TINY if args.tiny else []),
        *args.overrides,
    ]
    cfg = load_config(args.config, overrides)
    device = resolve_device(args.device)
    k = max(cfg.eval.knn_k)
    header = run_header(device)
    print(header_lines(header), flush=True)

    torch.manual_seed(cfg.train.seed)
    random_knn = knn_of_backbone(build_backbone(cfg.model).to(device), cfg, device)[k]
    rows = [["random init", "-", 0, cfg.data.batch_size_per_gpu, 0.0, random_knn, 0.0]]
    tick = time.perf_counter()
    ssl = train(cfg)
    seconds = time.perf_counter() - tick
    rows.append(["self-supervised (ours)", "no", ssl.iterations, cfg.data.batch_size_per_gpu, seconds, ssl.knn[k]])
    tick = time.perf_counter()
    backbone = supervised(cfg, device, args.lr, args.weight_decay, args.num_classes)
    seconds = time.perf_counter() - tick
    rows.append(
        ["supervised, same backbone and batches", "yes", total_iterations(cfg), cfg.data.batch_size_per_gpu, seconds,
         knn_of_backbone(backbone, cfg, device)[k]]
    )  # fmt: skip
    for row in rows[1:]:
        row.append(row[5] - random_knn)
    extra = {"config": Path(args.config).name, "k": str(k), "supervised lr": str(args.lr)}
    return {"header": {**header, **extra}, "rows": rows, "tiny": args.tiny, "k": k}


def report(record: dict[str, Any], args: argparse.Namespace) -> str:
    columns = [c if c != "k-NN top-1" else f"k-NN top-1 (k={record['k']})" for c in COLUMNS]
    table = format_table(columns, record["rows"])
    print()
    print(header_lines(record["header"]))
    print(table)
    if args.markdown:
        tiny = record["tiny"]
        title = "CPU tiny mode (illustration, not a measurement)" if tiny else "Supervised ceiling of the CPU fixture"
        body = f"**{title}** — {header_lines(record['header'])}\n\n{table}\n"
        section = "supervised-ceiling-tiny" if tiny else "supervised-ceiling"
        print(f"table written to {update_markdown(args.markdown, section, body)}")
    return table


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    record = run(args)
    report(record, args)
    return record


if __name__ == "__main__":
    main()
