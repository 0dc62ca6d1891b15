"""Data: datasets, multi-crop augmentation, iBOT masks, collate, resumable sampler and loader.

Importing this package loads numpy, Pillow and torch only; torchvision is imported when an
augmentation is built.
"""

from dinov2.data.arrays import ArrayDataset
from dinov2.data.augmentations import MultiCropAugmentation
from dinov2.data.augmented import AugmentedDataset
from dinov2.data.base import ImageDataset, Sample
from dinov2.data.batches import TRAIN_BATCH_KEYS, TrainBatches
from dinov2.data.blobs import BlobDataset, CIFAR10BlobDataset
from dinov2.data.collate import MultiCropCollate, collate_multicrop
from dinov2.data.datasets import DATASET_KINDS, build_dataset
from dinov2.data.demo import DEMO_CLASSES, DemoDataset, generate_demo
from dinov2.data.filelist import FileListDataset
from dinov2.data.folder import IMAGE_EXTENSIONS, ImageFolderDataset
from dinov2.data.loader import TrainLoader, build_train_loader
from dinov2.data.manifest import ManifestDataset
from dinov2.data.masking import MaskingGenerator, sample_masks
from dinov2.data.samplers import InfiniteSampler

__all__ = [
    "DATASET_KINDS",
    "DEMO_CLASSES",
    "IMAGE_EXTENSIONS",
    "TRAIN_BATCH_KEYS",
    "ArrayDataset",
    "AugmentedDataset",
    "BlobDataset",
    "CIFAR10BlobDataset",
    "DemoDataset",
    "FileListDataset",
    "ImageDataset",
    "ImageFolderDataset",
    "InfiniteSampler",
    "ManifestDataset",
    "MaskingGenerator",
    "MultiCropAugmentation",
    "MultiCropCollate",
    "Sample",
    "TrainBatches",
    "TrainLoader",
    "build_dataset",
    "build_train_loader",
    "collate_multicrop",
    "generate_demo",
    "sample_masks",
]
