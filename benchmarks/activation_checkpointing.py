"""Peak GPU memory and training throughput with and without activation checkpointing (one GPU).

    python benchmarks/activation_checkpointing.py --config train/vitg14 --batch-size 12 32

Runs the trainer's own build and step (``build_training`` + ``train_step``, through
``benchmarks.throughput.bench_ssl``) — packed student forward, EMA teacher, DINO + iBOT + KoLeo losses,
backward, clipping, AdamW, EMA update — under FSDP2 at world size 1 (NCCL, bf16 parameters, fp32
reduction, bf16 autocast), on synthetic batches already on the GPU (2 global crops of 224 px, 8 local
crops of 98 px, iBOT masks), so data loading is not measured. Prints one markdown
row per (activation checkpointing, batch size): images/s and peak allocated memory; "OOM" when it
does not fit.
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:  # run as a file: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.throughput import bench_ssl  # noqa: E402
from dinov2.config import load_config  # noqa: E402
from dinov2.distributed.env import distributed_session  # noqa: E402


def measure(cfg, batch_size: int, steps: int, warmup: int, device: torch.device, env) -> tuple[float, float]:
    """(images/s, peak GiB) of ``steps`` timed iterations after ``warmup``: the trainer's build and step
    (``benchmarks.throughput.bench_ssl``: ``build_training`` + ``train_step``)."""
    images_per_s, peak, _, _ = bench_ssl(cfg, batch_size, device, steps, warmup, env)
    return images_per_s, peak


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="train/vitg14")
    parser.add_argument("--batch-size", type=int, nargs="+", default=[12, 32])
    parser.add_argument("--modes", nargs="+", default=["none", "selective", "full"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    base = ["distributed.fsdp=true", "distributed.backend=nccl", "train.device=cuda", *args.overrides]
    cfg0 = load_config(args.config, base)
    device = torch.device("cuda", torch.cuda.current_device())
    name = torch.cuda.get_device_name(device)
    print(f"{cfg0.model.arch}/{cfg0.model.patch_size} on {name}, torch {torch.__version__}")
    print("| model | activation checkpointing | batch / GPU | img/s | peak memory (GiB) |")
    print("|---|---|---|---|---|")
    with distributed_session("nccl", always=True) as env:
        for mode in args.modes:
            cfg = load_config(args.config, [*base, f"distributed.activation_checkpointing={mode}"])
            for batch_size in args.batch_size:
                try:
                    rate, peak = measure(cfg, batch_size, args.steps, args.warmup, device, env)
                    row = f"{rate:.1f} | {peak:.1f}"
                except torch.OutOfMemoryError:
                    row = "OOM | –"
                gc.collect()
                torch.cuda.empty_cache()
                print(f"| {cfg.model.arch}/{cfg.model.patch_size} | {mode} | {batch_size} | {row} |", flush=True)


if __name__ == "__main__":
    main()
