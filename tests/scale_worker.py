"""torchrun worker for tests/test_scale.py (not a test module).

``torchrun --nproc-per-node W tests/scale_worker.py OUT MAX_ITERS RESUME_FROM [key=value …]``:

1. builds the training exactly as the trainer does (meta device → parallelize over the configured
   mesh → shards materialised with keyed init) and writes, from rank 0, the gathered full model state
   dict at step 0 to ``OUT/step0.pt``;
2. every rank writes ``OUT/rank{r}.json``: its local tensor sizes per network (``check_no_full_copy``)
   and, after one forward/backward and one AdamW step, the bytes of its real parameter, gradient and
   optimizer-state shards next to what ``dinov2.distributed.plan.state_bytes`` predicts for its shard;
3. trains with ``dinov2-train``'s ``train()`` in ``OUT/run`` up to ``MAX_ITERS`` (resuming from the
   checkpoints copied there when ``RESUME_FROM`` is a run directory, ``-`` for none).
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from dinov2.config import load_config
from dinov2.distributed.env import setup_distributed, shutdown_distributed
from dinov2.distributed.meta_init import check_no_full_copy
from dinov2.distributed.plan import state_bytes
from dinov2.launch.run import build_training, plan_shapes, train
from dinov2.train.trainer import build_loader


def _local_bytes(tensors) -> int:
    return sum((t.to_local() if hasattr(t, "to_local") else t).nbytes for t in tensors)


def main() -> None:
    out, max_iters, resume_from, *overrides = sys.argv[1:]
    out = Path(out)
    cfg = load_config("train/demo", overrides)
    env = setup_distributed(cfg.distributed.backend, always=True)
    try:
        device = torch.device("cpu")
        training = build_training(cfg, env, device)
        model = training.model
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if env.is_main:
            out.mkdir(parents=True, exist_ok=True)
            torch.save(full, out / "step0.pt")
        sizes = check_no_full_copy(model)
        param = next(model.student.parameters())
        shard_index = param.device_mesh.get_local_rank(param.device_mesh.ndim - 1)
        shards = param.device_mesh.size(param.device_mesh.ndim - 1)
        batch = next(iter(build_loader(cfg, env, device, 0, transform=model.train_transform())))
        model.train()
        model(batch, teacher_temp=0.04).loss.backward()
        students = [p for n in model.trained_networks().values() for p in n.parameters()]
        others = [
            p for name, n in model.networks().items() if name not in model.trained_networks() for p in n.parameters()
        ]
        for p in students:  # steady state: every parameter has had a gradient (here: no mask token grad)
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = _local_bytes(p.grad for p in students)
        training.optimizer.step()
        optim = _local_bytes(t for s in training.optimizer.state.values() for t in s.values())
        plan = state_bytes(plan_shapes(cfg), cfg, shards, shard_index)
        record = {
            "sizes": sizes,
            "mesh": list(param.device_mesh.shape),
            "actual": {
                "student_params": _local_bytes(students),
                "student_grads": grads,
                "optimizer": optim,
                "teacher_params": _local_bytes(others),
            },
            "plan": {k: getattr(plan, k) for k in ("student_params", "student_grads", "optimizer", "teacher_params")},
        }
        (out / f"rank{env.rank}.json").write_text(json.dumps(record))
        del training, model, full
        run = out / "run"
        if resume_from != "-" and env.is_main:
            shutil.copytree(resume_from, run, dirs_exist_ok=True)
        if env.distributed:
            torch.distributed.barrier()
        result = train(replace(cfg, train=replace(cfg.train, output_dir=str(run), max_iterations=int(max_iters))))
        assert result.iterations == int(max_iters), result
    finally:
        shutdown_distributed(env)


if __name__ == "__main__":
    main()
