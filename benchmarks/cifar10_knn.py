"""CIFAR-10 from scratch for a fixed wall-clock budget on one GPU, then k-NN on the 10k test split.

The 50k train images are decoded once into device memory (``uint8``); every batch is cut, coloured and
masked on the device by :class:`~dinov2.data.gpu.loader.GPUTrainLoader` (``data.pipeline=gpu``)
with the crop parameters of ``configs/train/cifar10.yaml``. The model, losses, optimizer, schedules and
step are the trainer's (``dinov2.launch.run.build_training``: ``SSLMetaArch``, ``parallelize``,
``param_groups``/``build_optimizer``; ``Schedules``; the step is ``Training.step``). Compiled blocks
have static shapes, so the teacher's evaluation batch and its training batch are two graphs, never a
recompilation with a dynamic batch dimension. The config's schedules (warm-ups, cosine lr/wd/momentum)
are stretched over the number of steps that fit the budget, re-estimated from
the measured step time as training goes. k-NN (weighted, T = ``eval.knn_temperature``) of the EMA
teacher's CLS features runs at ``--evals`` evenly spaced points; evaluation time is not charged to the
budget (nor is the k-NN of the randomly initialised network, printed as the baseline). Prints a table
(top-1 at k = 20 before and after, epochs, images/s, times) and saves the loss and
k-NN-vs-epoch curves as PNG (and JSON) in ``--output-dir``.

    python benchmarks/cifar10_knn.py                          # 10 minutes on the GPU
    python benchmarks/cifar10_knn.py --budget-min 3 --markdown docs/BENCHMARKS.md
    python benchmarks/cifar10_knn.py --device cpu --tiny       # CI: tiny ViT, 2000 images, ~20 s
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

if __name__ == "__main__" and not __package__:  # run as a file: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.devices import amp_context, resolve_device, run_header, synchronize  # noqa: E402
from benchmarks.tables import format_table, header_lines, update_markdown  # noqa: E402
from dinov2.config import load_config  # noqa: E402
from dinov2.data.blobs import BlobDataset  # noqa: E402
from dinov2.data.gpu import GPUTrainLoader, decode_dataset  # noqa: E402
from dinov2.distributed.env import DistEnv  # noqa: E402
from dinov2.eval.backbone_io import save_backbone  # noqa: E402
from dinov2.eval.features import backbone_features  # noqa: E402
from dinov2.eval.knn import knn_classify  # noqa: E402
from dinov2.train.schedules import Schedules  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path(os.environ.get("DINOV2_SHARED_DATA", REPO.parent / "shared" / "data")) / "cifar10"
TINY = [  # a ViT that trains for a few seconds on a CPU core
    "model.embed_dim=48",
    "model.depth=3",
    "model.num_heads=3",
    "model.drop_path_rate=0.0",
    "model.layerscale_init=0.1",
    "dino_head.out_dim=1024",
    "dino_head.hidden_dim=256",
    "dino_head.bottleneck_dim=64",
]
TINY_TRAIN, TINY_TEST = 2000, 1000  # class-balanced subsets (the blobs are sorted by class)
COLUMNS = [
    "model", "batch", "budget min", "train s", "steps", "epochs", "img/s", "random init (k=20)", "k-NN top-1 (k=20)",
    "target", "met",
]  # fmt: skip
RESTIMATE_EVERY = 25  # steps between re-estimates of the steps that fit the budget
TARGET_TOP1 = 85.0


# ------------------------------------------------------------------------------------------- data
def load_split(root: Path, split: str, count: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``uint8 (N, 32, 32, 3)`` and labels of a blobs split; ``count``: an evenly strided subset."""
    dataset = BlobDataset(root, split)
    indices = None
    if count is not None and count < len(dataset):
        indices = [int(i * len(dataset) / count) for i in range(count)]
    return decode_dataset(dataset, indices, num_threads=min(8, os.cpu_count() or 1))


# ------------------------------------------------------------------------------------------- k-NN
@torch.no_grad()
def tensor_features(
    backbone: torch.nn.Module, images: torch.Tensor, mean: list[float], std: list[float], batch_size: int
) -> torch.Tensor:
    """L2-normalised CLS features of ``uint8 (N, H, W, 3)`` images on the backbone's device."""
    device = images.device
    mean_t = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, 3, 1, 1)
    amp = amp_context(device)
    was_training = backbone.training
    backbone.eval()
    out = []
    try:
        with amp:
            for start in range(0, images.shape[0], batch_size):
                x = images[start : start + batch_size].permute(0, 3, 1, 2).float().div_(255.0)
                feats = backbone_features(backbone((x - mean_t) / std_t)).float()
                out.append(torch.nn.functional.normalize(feats, dim=-1))
    finally:
        backbone.train(was_training)
    return torch.cat(out)


def knn_top1(model: Any, data: dict[str, torch.Tensor], cfg: Any, ks: list[int], batch_size: int) -> dict[int, float]:
    backbone = model.exported_backbone()
    c = cfg.data.crops
    train_f = tensor_features(backbone, data["train_x"], c.mean, c.std, batch_size)
    test_f = tensor_features(backbone, data["test_x"], c.mean, c.std, batch_size)
    return knn_classify(
        train_f, data["train_y"], test_f, data["test_y"], ks=ks, temperature=cfg.eval.knn_temperature, num_classes=10
    )


# ------------------------------------------------------------------------------------- training
class BudgetSchedule:
    """The config's schedules stretched over the steps that fit a wall-clock budget.

    ``Schedules`` are defined over ``epochs × epoch_length`` iterations; step ``it`` of a run expected
    to last ``expected`` steps reads them at ``it × that / expected`` (never going back when the
    estimate grows). ``expected`` is re-estimated from the measured step time (:meth:`update`)."""

    def __init__(self, cfg: Any, batch_size: int) -> None:
        self.horizon = cfg.optim.epochs * cfg.optim.epoch_length
        self.schedules = Schedules.from_config(cfg, batch_size, self.horizon)
        self.expected = self.horizon  # until the first measurement
        self.position = 0

    def update(self, steps_done: int, seconds_left: float, seconds_per_step: float) -> None:
        self.expected = max(steps_done + 1, steps_done + int(seconds_left / max(seconds_per_step, 1e-9)))

    def at(self, it: int):
        self.position = max(self.position, min(self.horizon - 1, round(it * self.horizon / self.expected)))
        return self.schedules.at(self.position)


def pretrain(cfg: Any, data: dict[str, torch.Tensor], args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Train for ``args.budget_min`` minutes of training time; k-NN at ``args.evals`` points; with
    ``args.save_run``, write the EMA teacher's backbone and the config there as a run dir."""
    from dinov2.launch.run import build_training  # lazy: the trainer adds ~0.9 s (FSDP) to --help

    batch = cfg.data.batch_size_per_gpu
    num_train = data["train_x"].shape[0]
    training = build_training(cfg, DistEnv(), device)  # the trainer's build, compiled blocks with static shapes
    model = training.model
    model.train()
    loader = GPUTrainLoader(
        data["train_x"], data["train_y"], cfg.data.crops, cfg.data.masks, cfg.model.patch_size, batch,
        seed=cfg.train.seed, mask_workers=args.mask_workers,
    )  # fmt: skip
    schedule = BudgetSchedule(cfg, batch)
    budget = args.budget_min * 60.0
    eval_at = [budget * (i + 1) / args.evals for i in range(args.evals)]
    ks = sorted({20, *cfg.eval.knn_k})
    tick = time.perf_counter()
    random_init = knn_top1(model, data, cfg, ks, args.eval_batch_size)  # the baseline the run must beat
    print(f"  random init: k-NN top-1 (k=20) {random_init[20]:.2f} %", flush=True)
    random_init_top1 = {f"top1_k{k}": v for k, v in random_init.items()}
    losses: list[float] = []
    pending: list[torch.Tensor] = []
    curve: list[dict[str, float]] = []
    trained = 0.0  # training seconds before the current segment
    eval_seconds = time.perf_counter() - tick
    it = 0
    batches = iter(loader)
    segment_start = window_start = time.perf_counter()
    window_steps = 0
    while True:
        values = schedule.at(it)
        parts = training.step(next(batches), values)
        pending.append(parts["loss"])
        it += 1
        window_steps += 1
        now = time.perf_counter()
        clock = trained + now - segment_start
        if window_steps == RESTIMATE_EVERY:
            if it > RESTIMATE_EVERY:  # the first window holds the compilation
                schedule.update(it, budget - clock, (now - window_start) / window_steps)
            window_start, window_steps = now, 0
        if clock < eval_at[0]:
            continue
        synchronize(device)
        trained += time.perf_counter() - segment_start
        flushed = torch.stack(pending).float().cpu().tolist()
        pending.clear()
        if not all(math.isfinite(v) for v in flushed):
            raise RuntimeError(f"non-finite loss before step {it}: lower optim.base_lr or raise warm-up")
        losses.extend(flushed)
        tick = time.perf_counter()
        top1 = knn_top1(model, data, cfg, ks, args.eval_batch_size)
        eval_seconds += time.perf_counter() - tick
        epochs = it * batch / num_train
        curve.append({"epoch": epochs, "step": it, "train_s": trained, **{f"top1_k{k}": v for k, v in top1.items()}})
        print(
            f"  step {it:6d}  epoch {epochs:7.2f}  loss {losses[-1]:.4f}  k-NN top-1 (k=20) {top1[20]:.2f} %",
            flush=True,
        )
        eval_at.pop(0)
        if not eval_at:
            break
        segment_start = window_start = time.perf_counter()
        window_steps = 0
    if args.save_run:  # one process, no FSDP: the plain state dict is the full one
        run_dir = Path(args.save_run)
        save_backbone(model.exported_backbone(), cfg, run_dir, "teacher_backbone.safetensors")
        (run_dir / "knn.json").write_text(json.dumps({"top1": curve[-1], "random_init_top1": random_init_top1}))
        print(f"teacher backbone written to {run_dir}", flush=True)
    return {
        "steps": it,
        "epochs": it * batch / num_train,
        "train_seconds": trained,
        "eval_seconds": eval_seconds,
        "images_per_s": it * batch / trained,
        "losses": losses,
        "curve": curve,
        "top1": {k: v for k, v in curve[-1].items() if k.startswith("top1_")},
        "random_init_top1": random_init_top1,
    }


# ------------------------------------------------------------------------------------------ plots
def save_plots(result: dict[str, Any], batch: int, num_train: int, out_dir: Path, title: str) -> list[Path]:
    """``cifar10_loss.png`` (loss vs epoch) and ``cifar10_knn.png`` (k-NN top-1 vs epoch); [] without matplotlib."""
    try:
        import matplotlib  # optional dependency (extra `curation`)

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # optional dependency (extra `curation`)
    except ImportError:
        print("matplotlib is not installed: no plots")
        return []
    paths = []
    epochs = [(i + 1) * batch / num_train for i in range(len(result["losses"]))]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(epochs, result["losses"], linewidth=0.8)
    ax.set(xlabel="epoch", ylabel="training loss", title=title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(out_dir / "cifar10_loss.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    xs = [p["epoch"] for p in result["curve"]]
    ax.plot(xs, [p["top1_k20"] for p in result["curve"]], marker="o")
    ax.axhline(TARGET_TOP1, color="gray", linestyle="--", linewidth=0.8, label=f"target {TARGET_TOP1:.0f} %")
    ax.set(xlabel="epoch", ylabel="k-NN top-1 (k=20), %", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    paths.append(out_dir / "cifar10_knn.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


# ------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", default=str(DEFAULT_DATA), help="CIFAR-10 blobs folder (default: ../shared/data/cifar10)")
    p.add_argument("--config", default="train/cifar10", help="training config (default: configs/train/cifar10.yaml)")
    p.add_argument("--budget-min", type=float, default=None, help="training minutes (default 10; --tiny: 0.12)")
    p.add_argument("--batch-size", type=int, default=None, help="batch (default: the config's; --tiny: 64)")
    p.add_argument("--device", default="auto", help="auto | cuda | cpu")
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off"], help="per-block compile (auto: on GPU)")
    p.add_argument("--evals", type=int, default=None, help="k-NN evaluations, evenly spaced (default 10; --tiny 2)")
    p.add_argument("--eval-batch-size", type=int, default=1000)
    p.add_argument("--mask-workers", type=int, default=None, help="processes drawing iBOT masks (default 4; CPU 0)")
    p.add_argument("--tiny", action="store_true", help="CI mode: tiny ViT, 2000 train / 1000 test images")
    p.add_argument("--output-dir", default="outputs/bench_cifar10", help="PNG plots and cifar10_knn.json go here")
    p.add_argument("--markdown", default=None, help="write/update the table (and plot links) in this markdown file")
    p.add_argument(
        "--from-json", default=None, help="no training: report a saved cifar10_knn.json (table, plots, markdown)"
    )
    p.add_argument(
        "--save-run",
        default=None,
        help="also write the trained teacher backbone + config.yaml here (a run dir that dinov2-eval, "
        "dinov2-curate embed and DINOV2_CURATION_MODEL read)",
    )
    p.add_argument("overrides", nargs="*", help="extra config overrides key=value")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Decode, pretrain with periodic k-NN; the record that :func:`report` renders (and the JSON holds)."""
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    budget_min = args.budget_min if args.budget_min is not None else (0.12 if args.tiny else 10.0)
    args.budget_min = budget_min
    if args.evals is None:
        args.evals = 2 if args.tiny else 10
    if args.mask_workers is None:
        args.mask_workers = 4 if device.type == "cuda" else 0
    compiled = args.compile == "on" or (args.compile == "auto" and device.type == "cuda" and not args.tiny)
    overrides = [
        f"data.dataset.path={args.data}",
        "data.pipeline=gpu",
        "distributed.fsdp=false",
        f"distributed.compile={str(compiled).lower()}",
        "train.progress=false",
    ]
    if args.tiny:
        overrides += TINY + ["data.batch_size_per_gpu=64"]
    if args.batch_size:
        overrides.append(f"data.batch_size_per_gpu={args.batch_size}")
    overrides += list(args.overrides)
    cfg = load_config(args.config, overrides)
    header = run_header(device)
    print(header_lines(header), flush=True)

    tick = time.perf_counter()
    train_x, train_y = load_split(Path(args.data), "train", TINY_TRAIN if args.tiny else None)
    test_x, test_y = load_split(Path(args.data), "test", TINY_TEST if args.tiny else None)
    decode_seconds = time.perf_counter() - tick
    data = {"train_x": train_x.to(device), "train_y": train_y, "test_x": test_x.to(device), "test_y": test_y}
    print(f"decoded {len(train_x)} train + {len(test_x)} test images in {decode_seconds:.1f} s", flush=True)

    result = pretrain(cfg, data, args, device)
    batch = cfg.data.batch_size_per_gpu
    d = cfg.model.resolved().embed_dim
    name = f"{cfg.model.arch} D={d} /{cfg.model.patch_size}" + (" (tiny)" if args.tiny else "")
    top1 = result["top1"]["top1_k20"]
    on_target = not args.tiny and device.type == "cuda" and budget_min <= 10
    row = [
        name, batch, budget_min, result["train_seconds"], result["steps"], result["epochs"],
        result["images_per_s"], result["random_init_top1"]["top1_k20"], top1,
        f"≥ {TARGET_TOP1:.0f} % in 10 min" if on_target else "-",
        ("yes" if top1 >= TARGET_TOP1 else "no") if on_target else "-",
    ]  # fmt: skip
    extra = {"decode s": f"{decode_seconds:.1f}", "k-NN eval s": f"{result['eval_seconds']:.1f}"}
    return {
        "header": {**header, **extra},
        "config": overrides,
        "tiny": args.tiny,
        "name": name,
        "batch": batch,
        "num_train": int(train_x.shape[0]),
        "table": dict(zip(COLUMNS, row)),
        **result,
    }


def report(record: dict[str, Any], args: argparse.Namespace) -> list[Path]:
    """Print the table; save the JSON (unless read from it) and the plots; update the markdown."""
    table = format_table(COLUMNS, [list(record["table"].values())])
    print()
    print(header_lines(record["header"]))
    print(table)
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not args.from_json:
        (out_dir / "cifar10_knn.json").write_text(json.dumps(record, indent=1))
    plots = save_plots(record, record["batch"], record["num_train"], out_dir, record["name"])
    if args.markdown:
        md = Path(args.markdown)
        links = "\n".join(f"![{p.stem}]({os.path.relpath(p.resolve(), md.resolve().parent)})" for p in plots)
        tiny = record["tiny"]
        title = "CPU tiny mode (illustration, not a performance claim)" if tiny else "CIFAR-10 k-NN"
        body = f"**{title}** — {header_lines(record['header'])}\n\n{table}\n\n{links}\n"
        print(f"table written to {update_markdown(md, 'cifar10-tiny' if tiny else 'cifar10', body)}")
    return plots


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    record = json.loads(Path(args.from_json).read_text()) if args.from_json else run(args)
    plots = report(record, args)
    return {"row": record["table"], "plots": plots, **record}


if __name__ == "__main__":
    main()
