"""``dinov2-eval knn|linear|attention``: evaluate an exported backbone (see ``backbone_io``).

Examples::

    dinov2-eval knn --checkpoint outputs/run/export --dataset cifar10_blobs:/data/cifar10
    dinov2-eval linear --checkpoint outputs/run/export/teacher_backbone.pth \\
        --dataset cifar10_blobs:/data/cifar10 --dataset-opt subset_path=/data/cifar10-small/{split}_idx.npy
    dinov2-eval attention --checkpoint outputs/run/export --dataset demo: --output-dir attn/

A dataset spec is ``KIND:PATH[:SPLITS]``: ``SPLITS`` is ``TRAIN,TEST`` for ``--dataset`` (default
``train,test``) and a single split for ``--train-dataset`` / ``--test-dataset``, which override
either side. ``--dataset-opt key=value`` sets any other :class:`dinov2.config.DatasetConfig` field.
Defaults for the protocol (k, temperature, learning rates, ...) come from the ``eval`` section of
the checkpoint's ``config.yaml``; flags override them. Images are resized and centre-cropped to the
checkpoint's evaluation size (``eval_sizes``: the global crop size, after resizing the shorter side by
256 / 224), so folders of photos of any size work; ``--resize 0 --crop 0`` feeds them as they are.
When the train and test sides are the same images (a folder without splits), a fixed
``--holdout-fraction`` of them is the query set and the output says so (:mod:`dinov2.eval.holdout`).
``--checkpoint`` takes an export (file or directory), a run directory, or a training checkpoint
``RUN/checkpoints/ckpt_N``. Results are printed as a table and written to ``OUTPUT_DIR/<mode>.json``
(attention: also ``attention_maps.png``); a later call does not overwrite them but writes
``<mode>-2.json`` (``attention_maps-2.png``) and so on. Under ``torchrun`` feature extraction is sharded
over the ranks and k-NN runs on a sharded train set; rank 0 reports.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from dinov2.config import DatasetConfig
from dinov2.data import build_dataset
from dinov2.data.datasets import same_images
from dinov2.device import amp_dtype, resolve_device
from dinov2.distributed.checkpoint_dir import is_checkpoint
from dinov2.distributed.comm import rank_and_world
from dinov2.eval.attention_maps import attention_maps, column_names, save_attention_overlays
from dinov2.eval.backbone_io import find_weights, load_backbone
from dinov2.eval.features import eval_sizes, eval_transform, extract_features
from dinov2.eval.holdout import holdout_note, holdout_sets
from dinov2.eval.knn import knn_classify
from dinov2.eval.linear import linear_probe

MODES = ("knn", "linear", "attention")


# ------------------------------------------------------------------------------------------ parsing
def parse_dataset_spec(spec: str) -> tuple[str, str, list[str]]:
    """``KIND:PATH[:SPLITS]`` → ``(kind, path, splits)``; ``splits`` is empty when not given.

    The last ``:``-field counts as splits only when it has no path separator, so paths may contain
    colons.
    """
    kind, sep, rest = spec.partition(":")
    if not kind:
        raise argparse.ArgumentTypeError(f"dataset spec {spec!r} has no kind (expected KIND:PATH[:SPLITS])")
    path, splits = rest, []
    head, sep2, tail = rest.rpartition(":")
    if sep and sep2 and tail and "/" not in tail and os.sep not in tail:
        path, splits = head, [s for s in tail.split(",") if s]
    return kind, path, splits


def _dataset_config(kind: str, path: str, split: str, options: Sequence[str]) -> Any:
    cfg = DatasetConfig(kind=kind, path=path, split=split)
    names = {f.name: f for f in dataclasses.fields(DatasetConfig)}
    for item in options:
        key, eq, value = item.partition("=")
        if not eq or key not in names or key in ("kind", "path", "split"):
            raise SystemExit(
                f"--dataset-opt {item!r}: expected key=value with key one of "
                f"{', '.join(k for k in names if k not in ('kind', 'path', 'split'))}"
            )
        setattr(cfg, key, _coerce(value, getattr(cfg, key)))
    return cfg


def _coerce(value: str, default: Any) -> Any:
    """``value`` converted to the type of the field's ``default``."""
    if isinstance(default, bool):
        return value.lower() in ("1", "true", "yes", "on")
    for kind in (int, float):
        if isinstance(default, kind) or default is None:
            try:
                return kind(value)
            except ValueError:
                if default is not None:
                    raise SystemExit(f"--dataset-opt: {value!r} is not a valid {kind.__name__}") from None
    return value


def dataset_configs(args: argparse.Namespace) -> tuple[Any | None, Any | None]:
    """The ``(train, test)`` :class:`DatasetConfig` the arguments describe (None where absent)."""
    train = test = None
    if args.dataset:
        kind, path, splits = parse_dataset_spec(args.dataset)
        if len(splits) > 2:
            raise SystemExit(f"--dataset {args.dataset!r}: give at most two splits (TRAIN,TEST)")
        train_split = splits[0] if splits else "train"
        test_split = splits[1] if len(splits) > 1 else ("test" if len(splits) != 1 else splits[0])
        train = _dataset_config(kind, path, train_split, args.dataset_opt)
        test = _dataset_config(kind, path, test_split, args.dataset_opt)
    for side in ("train", "test"):
        spec = getattr(args, f"{side}_dataset")
        if spec:
            kind, path, splits = parse_dataset_spec(spec)
            if len(splits) > 1:
                raise SystemExit(f"--{side}-dataset {spec!r}: give one split")
            cfg = _dataset_config(kind, path, splits[0] if splits else side, args.dataset_opt)
            train, test = (cfg, test) if side == "train" else (train, cfg)
    return train, test


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--checkpoint", required=True, help="exported backbone weights file or its directory")
    common.add_argument("--config", help="training config.yaml (default: next to the weights)")
    common.add_argument("--dataset", help="KIND:PATH[:TRAIN,TEST], e.g. cifar10_blobs:/data/cifar10")
    common.add_argument("--train-dataset", help="KIND:PATH[:SPLIT] for the train side")
    common.add_argument("--test-dataset", help="KIND:PATH[:SPLIT] for the test side")
    common.add_argument(
        "--dataset-opt",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="another DatasetConfig field for both sides (repeatable)",
    )
    common.add_argument("--output-dir", help="where results go (default: <checkpoint dir>/eval)")
    common.add_argument("--batch-size", type=int, help="images per batch (default: eval.batch_size)")
    common.add_argument("--num-workers", type=int, default=0)
    common.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    common.add_argument(
        "--amp",
        default="auto",
        choices=("auto", "bf16", "fp16", "none"),
        help="autocast dtype (auto: bf16 on CUDA, none on CPU)",
    )
    common.add_argument(
        "--resize", type=int, help="resize the shorter side (default: eval.resize, else the checkpoint's; 0: none)"
    )
    common.add_argument("--crop", type=int, help="centre crop (default: eval.crop, else the global crop size; 0: none)")
    common.add_argument(
        "--holdout-fraction",
        type=float,
        help="when train and test are the same images: share held out as queries (default: eval.holdout_fraction)",
    )
    common.add_argument("--no-progress", action="store_true", help="hide progress bars")

    parser = argparse.ArgumentParser(prog="dinov2-eval", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    knn = sub.add_parser("knn", parents=[common], help="weighted k-NN on CLS features")
    knn.add_argument("--ks", type=int, nargs="+", help="neighbour counts (default: eval.knn_k)")
    knn.add_argument("--temperature", type=float, help="vote temperature (default: eval.knn_temperature)")
    lin = sub.add_parser("linear", parents=[common], help="linear probe with a learning-rate sweep")
    lin.add_argument("--lrs", type=float, nargs="+", help="learning rates (default: eval.linear_lrs)")
    lin.add_argument("--epochs", type=int, help="default: eval.linear_epochs")
    lin.add_argument("--val-fraction", type=float, help="default: eval.linear_val_fraction")
    lin.add_argument(
        "--patch-mean",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="append the mean patch token to CLS (default: eval.linear_patch_mean)",
    )
    lin.add_argument("--seed", type=int, default=0)
    att = sub.add_parser("attention", parents=[common], help="last-layer CLS attention maps as a PNG grid")
    att.add_argument("--num-images", type=int, help="default: eval.attention_num_images")
    att.add_argument("--top-mass", type=float, help="keep the top patches holding this mass (DINO: 0.6)")
    return parser


# ------------------------------------------------------------------------------------------ running
def _init_distributed(device_arg: str) -> bool:
    """Join the process group torchrun describes (when WORLD_SIZE > 1); True if this call did."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    use_cuda = torch.cuda.is_available() and device_arg != "cpu"
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return True


def _pick(value: Any, default: Any) -> Any:
    return default if value is None else value


def _format_table(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [list(map(str, header))] + [[f"{c:.2f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = [title] + ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(2, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run one evaluation mode; returns the results (also printed and written by rank 0)."""

    started_dist = _init_distributed(args.device)
    try:
        device = resolve_device(args.device)
        backbone, cfg = load_backbone(args.checkpoint, args.config, device)
        ecfg = cfg.eval
        train_cfg, test_cfg = dataset_configs(args)
        if test_cfg is None or (args.mode != "attention" and train_cfg is None):
            raise SystemExit("give --dataset (or --train-dataset and --test-dataset)")
        crops = cfg.data.crops
        resize, crop = eval_sizes(crops.global_crops_size, _pick(args.resize, ecfg.resize), _pick(args.crop, ecfg.crop))
        transform = eval_transform(resize, crop, crops.mean, crops.std)
        weights = find_weights(args.checkpoint)
        home = weights.parent.parent if is_checkpoint(weights) else weights.parent  # never into a ckpt dir
        output_dir = Path(args.output_dir) if args.output_dir else home / "eval"
        rank, _ = rank_and_world()
        common = {
            "transform": transform,
            "batch_size": _pick(args.batch_size, ecfg.batch_size),
            "device": device,
            "num_workers": args.num_workers,
            "amp_dtype": amp_dtype(args.amp, device),
            "progress": not args.no_progress,
        }
        test_set = build_dataset(test_cfg)
        results: dict[str, Any] = {
            "mode": args.mode,
            "checkpoint": str(args.checkpoint),
            "weights": str(weights),
            "resize": resize,
            "crop": crop,
            "test_dataset": dataclasses.asdict(test_cfg),
        }
        suffix = _free_suffix(output_dir, args.mode)
        if args.mode == "attention":
            results |= _run_attention(args, backbone, test_set, transform, crops, ecfg, output_dir, rank, suffix)
        else:
            results["train_dataset"] = dataclasses.asdict(train_cfg)
            train_set = build_dataset(train_cfg)
            if same_images(train_cfg, train_cfg.split, test_cfg, test_cfg.split):
                fraction = _pick(args.holdout_fraction, ecfg.holdout_fraction)
                train_set, test_set = holdout_sets(train_set, fraction)
                results["queries"] = holdout_note(fraction, len(test_set), seen_in_training=False)
                if rank == 0:
                    print(f"train and test are the same images: {results['queries']}")
            mode = _run_knn if args.mode == "knn" else _run_linear
            results |= mode(args, backbone, train_set, test_set, common, ecfg)
        if rank == 0:
            output_dir.mkdir(parents=True, exist_ok=True)
            out_json = output_dir / f"{args.mode}{suffix}.json"
            out_json.write_text(json.dumps(results, indent=2) + "\n")
            print(f"results written to {out_json}")
        return results
    finally:
        if started_dist:
            dist.destroy_process_group()


def _free_suffix(output_dir: Path, mode: str) -> str:
    """``""`` for the first result of ``mode`` in ``output_dir``, then ``-2``, ``-3`` …: nothing is overwritten."""
    suffix, n = "", 1
    while (output_dir / f"{mode}{suffix}.json").exists():
        n += 1
        suffix = f"-{n}"
    return suffix


def _run_knn(args, backbone, train_set, test_set, common, ecfg) -> dict[str, Any]:
    ks = list(_pick(args.ks, ecfg.knn_k))
    temperature = _pick(args.temperature, ecfg.knn_temperature)
    train_f, train_y = extract_features(backbone, train_set, gather=False, **common)  # sharded when distributed
    test_f, test_y = extract_features(backbone, test_set, **common)
    acc = knn_classify(train_f, train_y, test_f, test_y, ks, temperature, device=common["device"], distributed=True)
    if rank_and_world()[0] == 0:
        rows = [(k, a) for k, a in acc.items()]
        print(
            _format_table(
                f"k-NN top-1 (T={temperature}, train {len(train_set)}, test {len(test_set)})", ("k", "top-1 %"), rows
            )
        )
    return {
        "temperature": temperature,
        "top1": {str(k): a for k, a in acc.items()},
        "num_train": len(train_set),
        "num_test": len(test_set),
    }


def _run_linear(args, backbone, train_set, test_set, common, ecfg) -> dict[str, Any]:
    patch_mean = _pick(args.patch_mean, ecfg.linear_patch_mean)
    feats = {"patch_mean": patch_mean, "normalize": False}
    train_f, train_y = extract_features(backbone, train_set, **feats, **common)
    test_f, test_y = extract_features(backbone, test_set, **feats, **common)
    out = linear_probe(
        train_f,
        train_y,
        test_f,
        test_y,
        lrs=list(_pick(args.lrs, ecfg.linear_lrs)),
        epochs=_pick(args.epochs, ecfg.linear_epochs),
        batch_size=ecfg.linear_batch_size,
        val_fraction=_pick(args.val_fraction, ecfg.linear_val_fraction),
        seed=args.seed,
        device=common["device"],
    )
    if rank_and_world()[0] == 0:
        rows = [(f"{lr:g}", acc, "*" if lr == out["best_lr"] else "") for lr, acc in out["val_acc"].items()]
        print(
            _format_table(
                f"linear probe: val top-1 per lr (train {out['num_train']}, val {out['num_val']})",
                ("lr", "val %", "best"),
                rows,
            )
        )
        print(f"test top-1 at lr {out['best_lr']:g}: {out['test_acc']:.2f} % (test {len(test_set)})")
    return {"patch_mean": patch_mean, **out, "val_acc": {f"{k:g}": v for k, v in out["val_acc"].items()}}


def _run_attention(args, backbone, test_set, transform, crops, ecfg, output_dir, rank, suffix="") -> dict[str, Any]:
    count = min(_pick(args.num_images, ecfg.attention_num_images), len(test_set))
    picks = np.unique(np.linspace(0, len(test_set) - 1, count).round().astype(int)).tolist()
    images = torch.stack([transform(test_set[i][0]) for i in picks])
    maps = attention_maps(backbone, images, top_mass=_pick(args.top_mass, ecfg.attention_top_mass))
    png = output_dir / f"attention_maps{suffix}.png"
    if rank == 0:
        save_attention_overlays(images, maps, png, crops.mean, crops.std)
        print(f"attention maps of {len(picks)} images x {maps.shape[1]} heads written to {png}")
    return {
        "png": str(png),
        "indices": picks,
        "num_heads": int(maps.shape[1]),
        "grid": list(maps.shape[-2:]),
        "columns": column_names(int(maps.shape[1])),
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"dinov2-eval: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
