"""torchrun worker for tests/test_distributed.py (not a test module).

``torchrun --nproc-per-node W tests/dist_worker.py CKPT DUMP RESUME_DIR MAX_ITERS [key=value …]``:

1. builds the meta-architecture exactly as the trainer does (FSDP2 over W ranks) and loads the
   checkpoint ``CKPT`` into it and into an AdamW, then writes the *gathered* (unsharded) model and
   optimizer state dicts to ``DUMP`` from rank 0 — what a resume at world size W starts from;
2. resumes ``dinov2-train`` at world size W in ``RESUME_DIR`` (a copy of the run that saved ``CKPT``)
   up to ``MAX_ITERS`` iterations, through the ordinary ``train()`` entry point.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

from dinov2.config import load_config
from dinov2.distributed.env import setup_distributed, shutdown_distributed
from dinov2.distributed.parallelize import parallelize
from dinov2.launch.run import build_meta_arch, train
from dinov2.train.checkpoint import CheckpointManager
from dinov2.train.optim import build_optimizer, param_groups


def build(cfg, env):
    """Model and optimizer as ``dinov2.train.trainer`` builds them."""
    device = torch.device("cpu")
    model = build_meta_arch(cfg, device)
    parallelize(model, cfg.distributed, env, device)
    groups = param_groups(
        model.student,
        depth=model.student.backbone.num_layers(),
        layerwise_decay=cfg.optim.layerwise_decay,
        patch_embed_lr_mult=cfg.optim.patch_embed_lr_mult,
    )
    optimizer = build_optimizer(groups, (cfg.optim.adamw_beta1, cfg.optim.adamw_beta2), cfg.optim.fused, device)
    return model, optimizer


def gathered_state(model, optimizer) -> dict:
    """Full (unsharded) CPU state dicts keyed by parameter names, comparable across world sizes."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return {
        "model": get_model_state_dict(model, options=options),
        "optimizer": get_optimizer_state_dict(model, optimizer, options=options),
    }


def main() -> None:
    ckpt, dump, resume_dir, max_iters, *overrides = sys.argv[1:]
    cfg = load_config("train/demo", overrides)
    env = setup_distributed(cfg.distributed.backend, always=True)
    try:
        model, optimizer = build(cfg, env)
        CheckpointManager(Path(ckpt).parent).load(ckpt, model, optimizer)
        state = gathered_state(model, optimizer)
        if env.is_main:
            torch.save(state, dump)
        del model, optimizer, state
        resumed = replace(cfg, train=replace(cfg.train, output_dir=resume_dir, max_iterations=int(max_iters)))
        result = train(resumed)
        assert result.iterations == int(max_iters), result
    finally:
        shutdown_distributed(env)


if __name__ == "__main__":
    main()
