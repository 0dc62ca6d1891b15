"""Typed configuration of the curation pipeline (``dinov2-curate``).

Every key a user can set is a field below; ``configs/curation/default.yaml`` lists them with their
defaults. Loading goes through :func:`dinov2.config.load_config` (schema defaults ← YAML ←
``key=value`` overrides), which rejects unknown keys with a hint.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from dinov2.config import AmpName, CopyAugmentConfig, CopyKind, load_config


@dataclass
class EmbedInputConfig:
    """The images to embed: the fields of :class:`dinov2.config.DatasetConfig` that name a dataset."""

    kind: str = "folder"  # folder | filelist | manifest | blobs | arrays | demo | shards (dinov2.data.build_dataset)
    path: str = ""  # folder root, list/manifest file, blobs folder, .npz; "{split}" is replaced
    split: str = "train"  # for blobs/demo datasets, or a "{split}" in path / subset_path
    subset_path: str = ""  # blobs: optional .npy of indices to keep
    max_bad_fraction: float = 0.5  # stop when more than this fraction of a shard fails to decode
    source: str = ""  # name of the data source (the manifest's source column); default: the path


@dataclass
class EmbedModelConfig:
    """The embedding model."""

    # ours (our export/run dir) | interop (timm/HF DINOv2 weights file) | timm (model name) |
    # torchscript (a scripted descriptor model such as SSCD's *.torchscript.pt: images -> (B, D))
    kind: Literal["ours", "interop", "timm", "torchscript"] = "ours"
    path: str = ""  # ours: run dir or weights file (+ config.yaml beside it); interop/timm/torchscript: the file
    config: str = ""  # ours: training config.yaml (default: the one next to the weights)
    name: str = ""  # timm: model name, created with pretrained=False (weights from path, if given)
    img_size: int = 0  # timm: input size to create the model for (0: the model's default); torchscript: input side
    num_heads: int = 0  # interop: attention heads when they cannot be inferred (0: infer)
    # torchscript: the preprocessing the scripted model expects (it carries no config): normalisation
    # (empty: ImageNet's) and how an image becomes img_size x img_size — "crop" (shorter side, centre
    # crop) or "squash" (resized to a square, aspect ratio not kept, as SSCD recommends)
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)
    resize_mode: Literal["crop", "squash"] = "crop"


@dataclass
class EmbedConfig:
    """The ``embed`` stage: images -> L2-normalised features, as sharded .npy (data_curation.embeddings)."""

    input: EmbedInputConfig = field(default_factory=EmbedInputConfig)
    model: EmbedModelConfig = field(default_factory=EmbedModelConfig)
    crop: int = 0  # centre-crop side; 0: the training global crop size (ours), the model's input size otherwise
    resize: int = 0  # shorter side resized to this first; 0: same as crop
    mean: list[float] = field(default_factory=list)  # normalisation; empty: the checkpoint's / model's / ImageNet
    std: list[float] = field(default_factory=list)
    patch_mean: bool = False  # feature = [CLS, mean patch token] instead of CLS alone
    pooling: Literal["cls", "gem"] = "cls"  # cls: the final-norm CLS token; gem: GeM of the patch tokens
    gem_p: float = 3.0  # GeM exponent (1: mean of the positive parts, large: max)
    scales: list[float] = field(default_factory=lambda: [1.0])  # multi-scale: mean of the descriptors at these sizes
    flip_average: bool = False  # feature = mean of the image's and its mirror's (2x the compute; copy detection)
    whiten: bool = False  # PCA-whitening fitted on the pool (embeddings/whitening.npz), then L2-normalised
    whiten_dim: int = 0  # dimensions kept by the whitening (0: all)
    whiten_sample: int = 100_000  # pool rows the whitening is fitted on (a random sample when the pool is larger)
    dtype: str = "float16"  # float16 | float32 (.npy shards)
    shard_size: int = 100_000  # images per shard (the unit of resumption and of array-job work)
    batch_size: int = 256
    num_workers: int = 0  # DataLoader workers decoding images
    device: str = ""  # "": cuda when available, else cpu
    amp: AmpName = "auto"  # auto (bf16 on cuda, none on cpu) | bf16 | fp16 | none
    task_index: int = -1  # this task's share: data shards s with s % num_tasks == task_index
    num_tasks: int = 0  # 0 (with task_index -1): the SLURM array task of this job, else one task


@dataclass
class IndexConfig:
    """Nearest-neighbour search (dedup, decontaminate, sample-based retrieval)."""

    backend: str = "faiss"  # faiss | torch (exact matmul; for a GPU without faiss-gpu)
    kind: str = "auto"  # auto | flat | ivf | ivfpq   (auto: flat up to flat_max_rows, else ivf)
    flat_max_rows: int = 200_000
    nlist: int = 0  # IVF lists; 0: about 4·sqrt(rows)
    nprobe: int = 32  # IVF lists visited per query
    pq_m: int = 0  # IVF-PQ sub-quantizers (must divide the dim); 0: dim / 8
    pq_nbits: int = 8
    refine: bool = False  # IVF-PQ: re-rank with the exact vectors (exact similarities, more memory)
    refine_k_factor: float = 8.0  # refine: candidates re-ranked per query, as a multiple of k
    train_size: int = 0  # IVF training sample; 0: 64·nlist rows (IVF-PQ: at least 64·2^pq_nbits)
    use_gpu: str = "auto"  # auto | true | false (faiss GPU needs faiss-gpu and a visible GPU)
    torch_device: str = ""  # backend=torch: "" picks cuda when available, else cpu
    batch_size: int = 16384  # queries per search batch (bounds memory)
    add_batch_size: int = 65536  # rows converted and added to the index at a time


@dataclass
class DedupConfig:
    k: int = 64  # neighbours examined per image
    # cosine similarity above which two images are copies; auto: the threshold `calibrate` picks for this
    # embedding (run first when missing). The paper's 0.6 is for SSCD descriptors, not for DINO features.
    threshold: float | Literal["auto"] = "auto"
    max_removed_fraction: float = 0.5  # refuse (unless --force) to remove more of the pool than this
    keep: str = "first"  # first | random | most_connected | centroid | score
    score_file: str = ""  # keep=score: .npy with one score per embedding row (highest kept)
    seed: int = 0  # keep=random
    report_top: int = 20  # largest components listed in components.json
    report_members: int = 50  # member paths listed per reported component


@dataclass
class DecontaminateConfig:
    eval_sets: list[str] = field(default_factory=list)  # embedding dirs (relative: to the work dir)
    # cosine similarity to any eval image above which a component is dropped; auto: calibrate's
    threshold: float | Literal["auto"] = "auto"
    max_removed_fraction: float = 0.5  # refuse (unless --force) to drop more of the kept images than this
    report_top: int = 50  # most similar (pool, eval) pairs listed in report.json


@dataclass
class CalibrateConfig:
    """``calibrate``: plant near-copies of pool images, embed them like the pool, pick thresholds."""

    n_samples: int = 1000  # pool images copied (each once; kinds assigned in turn)
    kinds: list[CopyKind] = field(
        default_factory=lambda: ["crop", "flip", "jpeg", "jitter", "rotate", "overlay", "combo"]
    )
    transforms: CopyAugmentConfig = field(default_factory=CopyAugmentConfig)
    target_precision: float = 0.95  # the threshold is the lowest one whose estimated precision reaches this
    # precision is estimated for a pool where this fraction of the images is a copy of another pool image
    # (dedup), or of an evaluation image (decontaminate); lower fractions give stricter thresholds
    duplicate_fraction: float = 0.1
    contamination_fraction: float = 0.01
    k: int = 16  # nearest other images of each copy examined for false links
    n_eval_samples: int = 500  # decontaminate: evaluation images copied per evaluation set
    seed: int = 0


@dataclass
class QuerySetConfig:
    path: str = ""  # embeddings dir of a curated query dataset (relative: to the work dir)
    name: str = ""  # for the report; default: the folder name
    method: str = "sample"  # sample (k-NN per query) | cluster (clusters holding >= min_queries)
    k: int = 4  # sample: pool images per query
    min_similarity: float = -1.0  # sample: ignore neighbours below this cosine similarity
    min_queries: int = 3  # cluster: queries a pool cluster must hold to be selected (m)
    per_cluster: int = 10_000  # cluster: images taken from each selected cluster (n)


@dataclass
class RetrieveConfig:
    input: str = "auto"  # auto | all | dedup | decontaminate | path to a .npy of rows
    query_sets: list[QuerySetConfig] = field(default_factory=list)
    n_clusters: int = 1000  # cluster method: k-means of the pool into this many clusters
    niter: int = 20
    init: str = "kmeans++"  # random | kmeans++ | afkmc2
    cluster_pick: str = "random"  # random | closest (to the centroid)
    seed: int = 0


@dataclass
class ClusterConfig:
    input: str = "auto"  # auto | all | dedup | decontaminate | retrieve | path to a .npy of rows
    n_clusters: list[int] = field(default_factory=lambda: [1000, 100])  # per level, bottom up
    n_resampling_steps: list[int] = field(default_factory=lambda: [0])  # per level (one value: all)
    sample_size: list[int] = field(default_factory=lambda: [10])  # per level: points per cluster
    niter: int = 20
    init: str = "kmeans++"  # random | kmeans++ | afkmc2 (cheaper approximation of kmeans++)
    spherical: bool = True  # normalised centroids, cosine assignment
    max_points_per_centroid: int = 256  # faiss subsamples larger inputs
    seed: int = 0


@dataclass
class SampleConfig:
    target_size: int = 100_000
    leaf_selection: str = "random"  # random | closest (to the level-1 centroid)
    seed: int = 0


@dataclass
class ManifestConfig:
    selection: str = "auto"  # auto | all | dedup | decontaminate | retrieve | sample | .npy path
    source: str = ""  # the source column; default: the embeddings' source, else the selection
    labels: str = ""  # optional .npy / .txt with one label per embedding row
    output: str = ""  # default: <workdir>/manifest/manifest.csv


@dataclass
class ShardSetConfig:
    """How a shard set is laid out: the fields ``pack`` and ``export-shards`` share (data_curation.pack)."""

    name: str = "train"  # shard file names: {name}-000000.tar, ...
    samples_per_shard: int = 10_000
    shuffle: bool = True  # shuffle the samples across shards (seeded); false keeps the input order
    seed: int = 0
    verify: bool = True  # decode every image first; undecodable ones are left out and listed in skipped.txt
    num_threads: int = 4  # images read (and verified) in parallel


@dataclass
class PackConfig(ShardSetConfig):
    """``pack``: images (folder, file list, manifest or shards) -> tar shards (data_curation.pack)."""

    kind: str = "folder"  # folder | filelist | manifest | shards: what `path` is
    path: str = ""  # the images to pack
    output: str = "shards"  # folder for the shards (relative: to the work dir)


@dataclass
class ExportShardsConfig(ShardSetConfig):
    """``export-shards``: the manifest's images -> new shuffled tar shards (data_curation.export_shards)."""

    manifest: str = ""  # default: <workdir>/manifest/manifest.csv (or manifest.output)
    output: str = "export_shards"  # folder for the shards (relative: to the work dir)


@dataclass
class CurationConfig:
    embeddings: str = "embeddings"  # embeddings dir (relative: to the work dir)
    progress: bool = True  # progress bars and k-means logs
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    decontaminate: DecontaminateConfig = field(default_factory=DecontaminateConfig)
    calibrate: CalibrateConfig = field(default_factory=CalibrateConfig)
    retrieve: RetrieveConfig = field(default_factory=RetrieveConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    manifest: ManifestConfig = field(default_factory=ManifestConfig)
    pack: PackConfig = field(default_factory=PackConfig)
    export_shards: ExportShardsConfig = field(default_factory=ExportShardsConfig)


def load_curation_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> CurationConfig:
    """Schema defaults ← YAML ``path`` (or a preset such as ``curation/default``) ← overrides."""
    return load_config(path, overrides, schema=CurationConfig)
