"""The training loop: resume, step, log, checkpoint, stop on non-finite loss, export the teacher.

One code path for a single CPU process, one GPU, torchrun and SLURM (the process group comes from
``dinov2.distributed``). Each iteration: schedules → teacher targets → packed student forward →
losses → backward → clipping (per sub-module, ``dinov2.train.clipping``) → AdamW (the prototype layer at lr 0
while frozen) → EMA teacher update.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from dinov2.config import Amp, Config, to_yaml
from dinov2.data import TrainBatches, build_train_loader
from dinov2.data.gpu import build_gpu_train_loader
from dinov2.device import autocast, resolve_device
from dinov2.distributed.comm import all_reduce_sum_, world_size
from dinov2.distributed.env import DistEnv, distributed_session
from dinov2.distributed.mesh import build_mesh
from dinov2.distributed.meta_init import check_no_full_copy, materialize
from dinov2.distributed.parallelize import parallelize, should_shard
from dinov2.distributed.stop import StopRequest
from dinov2.train.checkpoint import CheckpointManager, NonFiniteStateError
from dinov2.train.clipping import clip_gradients
from dinov2.train.export import export_backbone
from dinov2.train.final_eval import knn_on_sets, knn_sets
from dinov2.train.init_from import check_init_from, init_from_run
from dinov2.train.meta_arch import SSLMetaArch
from dinov2.train.metrics import MetricsWriter
from dinov2.train.model_factory import ModelFactory
from dinov2.train.optim import apply_schedule, build_optimizer, param_groups
from dinov2.train.run_dir import preflight, write_run_config
from dinov2.train.schedules import Schedules, ScheduleValues

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The loss (or the state about to be checkpointed) became NaN or infinite; the run stops, its checkpoints
    (all finite) are left untouched, and the message names the newest one and the command that resumes it."""


@dataclass
class TrainResult:
    output_dir: Path
    iterations: int
    last_losses: dict[str, float] = field(default_factory=dict)
    exports: dict[str, Path] = field(default_factory=dict)  # by export name, the main result first
    knns: dict[str, dict[int, float]] = field(default_factory=dict)  # {name: {k: top-1 %}}
    knn_description: str = ""  # what the k-NN queries were (a held-out split, a second folder, a named fraction)
    num_skipped: int = 0
    interrupted: bool = False  # stopped early on a StopRequest (a checkpoint was saved at `iterations`)
    main: str = ""  # the name of the run's main result (the model's first export)

    @property
    def exported(self) -> Path | None:
        """The main result's exported weights."""
        return self.exports.get(self.main)

    @property
    def knn(self) -> dict[int, float] | None:
        """The main result's final k-NN."""
        return self.knns.get(self.main)


def total_iterations(cfg: Config) -> int:
    if cfg.train.max_iterations is not None:
        return cfg.train.max_iterations
    return cfg.optim.epochs * cfg.optim.epoch_length


def autocast_context(cfg: Config, device: torch.device):
    """bf16 autocast on CUDA (``train.amp=bf16``), none otherwise. fp16 is not offered (``Amp``): it would
    need loss scaling, and bf16 has fp32's exponent range on every GPU this recipe targets."""
    return autocast(device, torch.bfloat16 if device.type == "cuda" and cfg.train.amp == Amp.bf16 else None)


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def make_optimizer(model: SSLMetaArch, cfg: Config, device: torch.device):
    """AdamW over the parameter groups of every trained network (the student; several when distilling
    into more than one). The prototype layers' groups carry ``is_last_layer`` (lr 0 while frozen);
    the layer-wise lr decay is the meta-architecture's (``model.layerwise_decay``)."""
    groups = [
        group
        for network in model.trained_networks().values()
        for group in param_groups(
            network,
            depth=network.backbone.num_layers(),
            layerwise_decay=model.layerwise_decay,
            patch_embed_lr_mult=cfg.optim.patch_embed_lr_mult,
        )
    ]
    return build_optimizer(groups, (cfg.optim.adamw_beta1, cfg.optim.adamw_beta2), cfg.optim.fused, device)


@dataclass
class Training:
    """What :func:`build_training` builds, and :meth:`step`: the trainer's iteration on it."""

    model: SSLMetaArch
    optimizer: torch.optim.Optimizer
    cfg: Config
    device: torch.device

    def step(self, batch: dict[str, Any], values: ScheduleValues) -> dict[str, torch.Tensor]:
        return train_step(self.model, self.optimizer, batch, values, self.cfg, self.device)


def build_training(cfg: Config, env: DistEnv, device: torch.device, factory: ModelFactory) -> Training:
    """Model from ``factory`` on the meta device (a distillation teacher loaded, shard by shard over the
    mesh when sharded) → activation checkpointing, backend resolution, compilation, sharding over the
    mesh (``parallelize``) → each rank's shards materialised and initialised
    (``dinov2.distributed.meta_init``) → optimizer over the sharded parameters. The benchmarks call this
    too (``dinov2.launch.run.build_training``), so what they time is what trains."""
    torch.manual_seed(cfg.train.seed)
    mesh = build_mesh(cfg.distributed.mesh, env, device) if should_shard(cfg.distributed, env) else None
    model = factory.build(cfg, mesh, device)
    mesh = parallelize(model, cfg.distributed, env, device, mesh)
    materialize(model, device, cfg.train.seed)
    if mesh is not None:
        check_no_full_copy(model)
    torch.manual_seed(cfg.train.seed * 1000 + env.rank)  # per-rank stream for stochastic depth
    optimizer = make_optimizer(model, cfg, device)
    return Training(model, optimizer, cfg, device)


def train_step(
    model: SSLMetaArch,
    optimizer: torch.optim.Optimizer,
    batch: dict[str, Any],
    values: ScheduleValues,
    cfg: Config,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """One iteration: schedules (the prototype layers at lr 0 while frozen, as the reference: their Adam
    moments and the clip norms still see their gradients) → forward (autocast on GPU) → backward →
    clipping of each trained network (per sub-module by default, ``optim.clip_grad_mode``) → AdamW → EMA.
    Returns the detached loss terms and gradient norms (no host synchronisation): ``grad_norm`` (the
    whole network's) and ``grad_norm/{backbone,dino_head,ibot_head}``, prefixed ``{name}/`` for the
    extra students."""
    last_layer_lr = 0.0 if values.freeze_last_layer else values.lr
    apply_schedule(optimizer, values.lr, values.weight_decay, last_layer_lr)
    with autocast_context(cfg, device):
        step = model(batch, teacher_temp=values.teacher_temp)
    step.loss.backward()
    for name, network in model.trained_networks().items():
        prefix = "" if name == "student" else f"{name}/"
        norms = clip_gradients(network, cfg.optim.clip_grad, cfg.optim.clip_grad_mode)
        step.parts[f"{prefix}grad_norm"] = norms.pop("total")
        step.parts.update({f"{prefix}grad_norm/{module}": norm for module, norm in norms.items()})
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    model.update_ema(values.momentum)
    return step.parts


def build_loader(
    cfg: Config, env: DistEnv, device: torch.device, start_iteration: int, transform: Any = None
) -> TrainBatches:
    """The training batches of this rank: PIL/torchvision workers (``data.pipeline=cpu``) or batched
    augmentation of a decoded uint8 dataset on the device (``data.pipeline=gpu``). ``transform``: the
    meta-architecture's per-image transform (None: multi-crop)."""
    common = dict(
        patch_size=cfg.model.patch_size,
        seed=cfg.train.seed,
        rank=env.rank,
        world_size=env.world_size,
        start_iteration=start_iteration,
    )
    if cfg.data.pipeline == "cpu":
        return build_train_loader(cfg.data, transform=transform, **common)
    return build_gpu_train_loader(cfg.data, device=device, **common)


def train(cfg: Config, factory: ModelFactory, stop: StopRequest | None = None) -> TrainResult:
    """Train what ``factory`` builds (resuming from the newest checkpoint in the output dir). When
    ``stop`` is requested (e.g. from a signal handler), all ranks save a checkpoint at the next iteration
    and return early. ``dinov2.launch.run.train`` picks the factory from the configuration."""
    with distributed_session(cfg.distributed.backend, always=cfg.distributed.fsdp) as env:
        return _train(cfg, factory, env, stop)


def _train(cfg: Config, factory: ModelFactory, env: DistEnv, stop: StopRequest | None = None) -> TrainResult:
    output_dir = Path(cfg.train.output_dir)
    preflight(cfg)  # nothing is written before the configuration and the run dir are checked
    init_source = check_init_from(cfg.train.init_from, cfg) if cfg.train.init_from else None
    device = resolve_device(cfg.train.device, env.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)

    training = build_training(cfg, env, device, factory)
    model, optimizer = training.model, training.optimizer
    global_batch = cfg.data.batch_size_per_gpu * env.world_size
    total = total_iterations(cfg)
    schedules = Schedules.from_config(cfg, global_batch, total)
    checkpoints = CheckpointManager(output_dir / "checkpoints", cfg.train.keep_last_checkpoints)

    start, sample_position = 0, None
    resumed = checkpoints.resume(model, optimizer)  # the newest checkpoint that loads whole and finite
    if resumed is not None:
        start, sample_position = resumed.iteration, resumed.sample_position
        if resumed.world_size != env.world_size:
            torch.manual_seed(cfg.train.seed * 1000 + env.rank + 7919 * start)
        if env.is_main:
            logger.info("resumed from %s at iteration %d", resumed.path, start)
    elif cfg.train.init_from:  # a new phase of another run (dinov2-train --init-from): its weights only
        init_from_run(model, cfg, init_source)
    if env.is_main:
        write_run_config(cfg)
    last_checkpoint = resumed.path if resumed is not None else None

    loader = build_loader(cfg, env, device, start, transform=model.train_transform())
    metrics = MetricsWriter(output_dir, enabled=env.is_main, tensorboard=cfg.train.tensorboard, start_iteration=start)
    result = TrainResult(output_dir=output_dir, iterations=start)
    progress = _progress_bar(cfg, env, start, total)
    model.train()
    pending: list[tuple[int, dict[str, torch.Tensor], float, float]] = []
    tick = time.perf_counter()
    if sample_position is not None:  # continue the global sample stream where it stopped, at any world size
        loader.load_state_dict({"position": sample_position})
    batches = iter(loader)
    try:
        for it in range(start, total):
            values = schedules.at(it)
            batch = _to_device(next(batches), device)
            parts = train_step(model, optimizer, batch, values, cfg, device)
            pending.append((it, parts, values.lr, values.teacher_temp))

            done = it + 1
            stopping = stop is not None and done < total and stop.agreed(done, device)
            save_now = done % cfg.train.checkpoint_every == 0 or done == total or stopping
            if done % cfg.train.log_every == 0 or save_now:
                elapsed = time.perf_counter() - tick
                images_per_s = len(pending) * global_batch / max(elapsed, 1e-9)
                try:
                    last = _flush(pending, metrics, images_per_s, loader.num_skipped)
                except NonFiniteLossError as e:
                    raise NonFiniteLossError(f"{e}; {_resume_hint(cfg, last_checkpoint)}") from None
                result.last_losses = last
                if progress is not None:
                    progress.update(len(pending))
                    progress.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{values.lr:.2e}", img_s=f"{images_per_s:.0f}")
                pending.clear()
                tick = time.perf_counter()
            if save_now:
                try:
                    last_checkpoint = checkpoints.save(
                        done, model, optimizer, sample_position=loader.state_dict()["position"]
                    )
                except NonFiniteStateError as e:
                    raise NonFiniteLossError(f"{e}: not saved; {_resume_hint(cfg, last_checkpoint)}") from None
            result.iterations = done
            if stopping:
                result.interrupted = True
                break
    finally:
        if progress is not None:
            progress.close()
        metrics.close()
    result.num_skipped = loader.num_skipped
    if result.interrupted:
        if env.is_main:
            logger.warning("stopped at iteration %d (%s); checkpoint saved", result.iterations, stop.reason)
        return result
    if env.is_main and loader.num_skipped:
        logger.warning("%d undecodable images were skipped (see the warnings above for paths)", loader.num_skipped)
    sets = knn_sets(cfg) if cfg.eval.final_knn else None
    if sets is not None and sets.skip_reason:
        if env.is_main:
            logger.warning("final k-NN skipped: %s", sets.skip_reason)
        sets = None
    exports = model.exports()
    result.main = exports[0].name  # the EMA teacher, or the (first) distilled student
    result.knn_description = sets.description if sets is not None else ""
    for export in exports:
        if cfg.train.export_teacher:
            result.exports[export.name] = export_backbone(export.backbone, output_dir / export.filename, env)
            if export.config is not None and env.is_main:  # what dinov2-eval / dinov2-curate rebuild it from
                (output_dir / f"{export.name}_config.yaml").write_text(to_yaml(export.config))
        if sets is not None:
            result.knns[export.name] = knn_on_sets(export.backbone, sets, cfg, device)
    return result


def _resume_hint(cfg: Config, checkpoint: Path | None) -> str:
    """The newest (finite) checkpoint of the run and the exact command that resumes from it, more gently."""
    run_config = Path(cfg.train.output_dir) / "config.yaml"
    command = f"dinov2-train --config {run_config} optim.base_lr={cfg.optim.base_lr / 2:g}"
    if checkpoint is None:
        return f"no checkpoint was written yet; start again with a lower learning rate: {command}"
    return f"the newest finite checkpoint is {checkpoint}; resume from it with a lower learning rate: {command}"


def _flush(
    pending: list[tuple[int, dict[str, torch.Tensor], float, float]],
    metrics: MetricsWriter,
    images_per_s: float,
    num_skipped: int,
) -> dict[str, float]:
    """Bring the pending loss values to the host (one sync per log interval), averaged over the ranks
    (one all-reduce per log interval), check them, log them."""
    names = sorted(pending[0][1])
    values = torch.stack([torch.stack([parts[n].float() for n in names]) for _, parts, _, _ in pending])
    if world_size() > 1:
        values = all_reduce_sum_(values) / world_size()
    stacked = dict(zip(names, values.cpu().unbind(1), strict=True))
    last: dict[str, float] = {}
    for row, (it, _, lr, temp) in enumerate(pending):
        record: dict[str, Any] = {"iteration": it}
        record.update({name: values[row].item() for name, values in stacked.items()})
        bad = [name for name in stacked if name.split("/")[-1] == "loss" and not math.isfinite(record[name])]
        if bad:
            raise NonFiniteLossError(f"{bad[0]} is {record[bad[0]]} at iteration {it}: stopping")
        record.update({"lr": lr, "teacher_temp": temp, "images_per_s": images_per_s, "num_skipped": num_skipped})
        metrics.write(record)
        last = record
    return last


def _progress_bar(cfg: Config, env: DistEnv, start: int, total: int):
    if not (cfg.train.progress and env.is_main):
        return None
    return tqdm(total=total, initial=start, desc="train", unit="it", dynamic_ncols=True)
