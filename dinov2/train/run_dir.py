"""The run directory's guard: checks made before any work, and ``config.yaml`` written only after them.

:func:`preflight` validates the configuration (:func:`dinov2.config.validate`), resolves a dataset kind
given as ``auto`` (or ``demo`` with a path) to what the path holds, and refuses a run directory that holds
a run of another model or data configuration (:func:`check_run_dir`): resuming it would load a checkpoint of
another shape, and writing its ``config.yaml`` would make the finished run's export unloadable. The keys
that must match are :data:`RUN_KEYS`; the others (learning rate, iterations, logging…) may change on resume.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from dinov2.config import Config, ConfigError, load_run_config, to_yaml, validate
from dinov2.data.datasets import resolve_kind, split_path

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.yaml"
#: the configuration a run directory's checkpoints and exports belong to (prefixes of dotted keys)
RUN_KEYS = (
    "model.",
    "dino_head.",
    "ibot_head",  # null (shared with the DINO head) or its sizes
    "data.dataset.",
    "train.objective",
    "distill.enabled",
    "distill.teacher_model.",
    "distill.extra_students",
)


def flatten(cfg: Config) -> dict[str, Any]:
    """``{dotted key: value}`` of every leaf of ``cfg`` (lists stay whole)."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            out[prefix[:-1]] = node

    walk(OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True), "")
    return out


def differing_run_keys(old: Config, new: Config) -> list[tuple[str, Any, Any]]:
    """``(key, old value, new value)`` for each :data:`RUN_KEYS` key that differs."""
    a, b = flatten(old), flatten(new)
    keys = sorted(k for k in set(a) | set(b) if k.startswith(RUN_KEYS) or k in RUN_KEYS)
    return [(k, a.get(k), b.get(k)) for k in keys if a.get(k) != b.get(k)]


def check_run_dir(cfg: Config) -> None:
    """ConfigError when ``train.output_dir`` holds a run whose model / data configuration differs."""
    path = Path(cfg.train.output_dir) / CONFIG_NAME
    if not path.is_file():
        return
    try:
        old = load_run_config(path)
    except ConfigError as e:
        where = cfg.train.output_dir
        raise ConfigError(f"train.output_dir={where} holds a config.yaml that does not load ({e})") from None
    diffs = differing_run_keys(old, cfg)
    if diffs:
        shown = ", ".join(f"{k}: {o!r} -> {n!r}" for k, o, n in diffs[:6]) + (" …" if len(diffs) > 6 else "")
        raise ConfigError(
            f"train.output_dir={cfg.train.output_dir} holds a run with another configuration ({shown}); "
            "use another train.output_dir, or the run's own settings to resume it"
        )


def resolve_dataset_kind(cfg: Config) -> None:
    """Replace ``data.dataset.kind`` ``auto`` (or ``demo`` with a path) by the kind its path holds, in place."""
    data = cfg.data.dataset
    if data.kind == "auto" or (data.kind == "demo" and data.path):
        try:
            kind = resolve_kind(data)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        logger.info("data.dataset.kind=%s with data.dataset.path=%s: reading it as %s", data.kind, data.path, kind)
        data.kind = kind


def check_splits(cfg: Config) -> None:
    """ConfigError when a folder with split sub-folders lacks the training split (or the final k-NN's)."""
    data = cfg.data.dataset
    splits = [data.split] + ([cfg.eval.test_split] if cfg.eval.final_knn and not cfg.eval.test_path else [])
    try:
        for split in splits:
            split_path(data, split)
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None


def preflight(cfg: Config) -> None:
    """Every check that needs no model or data loading (module docstring); ConfigError, nothing written."""
    validate(cfg)
    resolve_dataset_kind(cfg)
    check_splits(cfg)
    check_run_dir(cfg)


def write_run_config(cfg: Config) -> None:
    """``config.yaml`` of the run, written atomically."""
    directory = Path(cfg.train.output_dir)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / (CONFIG_NAME + ".tmp")
    tmp.write_text(to_yaml(cfg))
    tmp.replace(directory / CONFIG_NAME)
