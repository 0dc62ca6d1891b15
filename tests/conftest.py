"""Shared test fixtures and the `gpu` marker's skip rule."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from dinov2.launch.run import build_meta_arch
from dinov2.train.checkpoint import CheckpointManager

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("DINOV2_SHARED_DATA", REPO.parent / "shared" / "data"))


# the session-wide pretraining run (minutes of CPU) behind these fixtures makes any test using them slow
SLOW_FIXTURES = ("cifar_pretrained", "curation_model")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if any(name in getattr(item, "fixturenames", ()) for name in SLOW_FIXTURES):
            item.add_marker(pytest.mark.slow)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (CIFAR-10 blobs); tests that need it fail loudly in CI if it is missing."""
    if not (SHARED_DATA / "cifar10").is_dir():
        if os.environ.get("CI"):
            raise RuntimeError(f"shared data not found at {SHARED_DATA}")
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@dataclass
class PretrainedRun:
    run_dir: Path  # holds config.yaml, teacher_backbone.safetensors, checkpoints/, metrics.jsonl
    knn: dict[int, float]  # k-NN top-1 (%) of the trained teacher on the cifar10-small test split
    random_knn: dict[int, float]  # the same for the randomly initialised network


def cifar_small_overrides(shared_data: Path) -> list[str]:
    return [
        f"data.dataset.path={shared_data / 'cifar10'}",
        f"data.dataset.subset_path={shared_data / 'cifar10-small'}/{{split}}_idx.npy",
    ]


@pytest.fixture(scope="session")
def cifar_pretrained(shared_data, tmp_path_factory) -> PretrainedRun:
    """A small ViT pretrained by the trainer on cifar10-small for a few CPU minutes (session-wide, so the
    learning, distillation and curation tests share one run)."""
    from dinov2.config import load_config
    from dinov2.launch.run import train
    from dinov2.models import build_backbone
    from dinov2.train.final_eval import knn_of_backbone

    run_dir = tmp_path_factory.mktemp("cifar_pretrained")
    cfg = load_config(
        REPO / "tests" / "configs" / "cifar10_small_cpu.yaml",
        cifar_small_overrides(shared_data) + [f"train.output_dir={run_dir}", "train.progress=false"],
    )
    torch.manual_seed(cfg.train.seed)
    random_knn = knn_of_backbone(build_backbone(cfg.model), cfg, torch.device("cpu"))
    result = train(cfg)
    return PretrainedRun(run_dir, result.knn, random_knn)


@pytest.fixture(scope="session")
def curation_model(request) -> PretrainedRun:
    """The model the curation end-to-end tests embed with: the run dir named by ``DINOV2_CURATION_MODEL``
    (e.g. written on a GPU by ``benchmarks/cifar10_knn.py --save-run DIR``), else the CPU fixture
    ``cifar_pretrained``. ``knn`` / ``random_knn`` come from the run's ``knn.json`` when it has one."""
    external = os.environ.get("DINOV2_CURATION_MODEL")
    if not external:
        return request.getfixturevalue("cifar_pretrained")
    run_dir = Path(external).resolve()
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"DINOV2_CURATION_MODEL={external}: no config.yaml there (expected a run dir)")
    knn_file = run_dir / "knn.json"
    saved = json.loads(knn_file.read_text()) if knn_file.is_file() else {}

    def by_k(top1: dict) -> dict[int, float]:
        return {int(k.removeprefix("top1_k")): v for k, v in top1.items() if k.startswith("top1_k")}

    return PretrainedRun(run_dir, by_k(saved.get("top1", {})), by_k(saved.get("random_init_top1", {})))


def uses_cpu_fixture_model() -> bool:
    return not os.environ.get("DINOV2_CURATION_MODEL")


# ------------------------------------------------------------------------- backbone output checks
def seeded_images(size: int) -> torch.Tensor:
    """Two random ``size × size`` images, the same for a given size."""
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size))


@torch.no_grad()
def all_tokens(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A backbone's output as one ``(B, 1 + registers + patches, D)`` tensor, the layout timm and HF return."""
    out = model(x)
    return torch.cat([out["cls"][:, None], out["registers"], out["patch"]], dim=1)


def checkpoint_state(cfg, checkpoints: Path, name: str | None = None) -> dict[str, torch.Tensor]:
    """The meta-arch state (built from ``cfg``, on the CPU) saved in checkpoint ``name`` of the folder
    ``checkpoints``; the latest one by default."""
    model = build_meta_arch(cfg, torch.device("cpu"))
    manager = CheckpointManager(checkpoints)
    manager.load(manager.latest() if name is None else checkpoints / name, model, None)
    return model.state_dict()


# ------------------------------------------------------------------------------------------- SLURM
# One real one-node SLURM cluster (munged + slurmctld + slurmd, tests/slurm_cluster.py) for the whole
# session, started on first use and stopped at the end. Needs root; installs the Debian packages
# (tools/install_slurm.sh) when they are missing. Without root: skip; under CI=true: fail instead.
@pytest.fixture(scope="session")
def slurm_cluster():
    import shutil
    import subprocess

    from slurm_cluster import SlurmCluster, SlurmUnavailable, missing_programs

    ci = os.environ.get("CI", "").lower() in ("1", "true", "yes")
    if os.geteuid() != 0 and not ci:
        pytest.skip("starting slurmctld/slurmd/munged needs root (CI=true makes this a failure)")
    if missing_programs() and os.geteuid() == 0:
        subprocess.run(["bash", str(REPO / "tools" / "install_slurm.sh")], check=False, timeout=600)
    cluster = SlurmCluster()
    try:
        cluster.start()
    except SlurmUnavailable as e:
        shutil.rmtree(cluster.root, ignore_errors=True)
        if ci:
            pytest.fail(f"CI=true but the SLURM cluster cannot start: {e}")
        pytest.skip(f"no SLURM cluster: {e}")
    yield cluster
    cluster.stop()
    shutil.rmtree(cluster.root, ignore_errors=True)
