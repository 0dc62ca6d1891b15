"""Peak GPU memory and training throughput with and without activation checkpointing (one GPU).

    python benchmarks/activation_checkpointing.py --config train/vitg14 --batch-size 12 32

Runs the real training step — packed student forward, EMA teacher, DINO + iBOT + KoLeo losses,
backward, global-norm clipping, AdamW, EMA update — under FSDP2 at world size 1 (NCCL, bf16
parameters, fp32 reduction, bf16 autocast), on a synthetic batch already on the GPU (2 global crops
of 224 px, 8 local crops of 98 px, iBOT masks), so data loading is not measured. Prints one markdown
row per (activation checkpointing, batch size): images/s and peak allocated memory; "OOM" when it
does not fit.
"""

from __future__ import annotations

import argparse
import gc
import time

import torch

from dinov2.config import load_config
from dinov2.data.collate import collate_multicrop
from dinov2.distributed.env import distributed_session
from dinov2.distributed.parallelize import clip_grad_norm, parallelize
from dinov2.train.optim import apply_schedule, build_optimizer, param_groups
from dinov2.train.trainer import autocast_context, build_meta_arch


def synthetic_batch(cfg, batch_size: int, device: torch.device) -> dict:
    crops = cfg.data.crops
    samples = [
        {
            "global_crops": [torch.randn(3, crops.global_crops_size, crops.global_crops_size) for _ in range(2)],
            "local_crops": [
                torch.randn(3, crops.local_crops_size, crops.local_crops_size) for _ in range(crops.local_crops_number)
            ],
        }
        for _ in range(batch_size)
    ]
    batch = collate_multicrop(samples, cfg.data.masks, cfg.model.patch_size)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def measure(cfg, batch_size: int, steps: int, warmup: int, device: torch.device, env) -> tuple[float, float]:
    """(images/s, peak GiB) of ``steps`` timed iterations after ``warmup``."""
    torch.manual_seed(0)
    model = build_meta_arch(cfg, device)
    parallelize(model, cfg.distributed, env, device)
    groups = param_groups(model.student, model.student.backbone.num_layers(), 1.0, 1.0)
    optimizer = build_optimizer(groups, (0.9, 0.999), True, device)
    apply_schedule(optimizer, 1e-5, 0.04)
    batch = synthetic_batch(cfg, batch_size, device)
    model.train()
    torch.cuda.reset_peak_memory_stats(device)
    start = 0.0
    for i in range(warmup + steps):
        if i == warmup:
            torch.cuda.synchronize(device)
            start = time.perf_counter()
        with autocast_context(cfg, device):
            step = model(batch, teacher_temp=0.07)
        step.loss.backward()
        clip_grad_norm(model.student, cfg.optim.clip_grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.update_ema(0.994)
    torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    del model, optimizer, batch, step
    return steps * batch_size / elapsed, peak


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
