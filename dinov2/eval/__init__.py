"""Evaluation of frozen backbones: k-NN, linear probe, attention maps (and the ``dinov2-eval`` CLI).

Importing this package loads torch only; torchvision, tqdm, matplotlib and the model code are
imported by the functions that need them.
"""

from dinov2.eval.attention_maps import attention_maps, save_attention_overlays, top_mass_mask
from dinov2.eval.backbone_io import load_backbone, save_backbone
from dinov2.eval.features import eval_sizes, eval_transform, extract_features
from dinov2.eval.knn import knn_classify, knn_predict
from dinov2.eval.linear import linear_probe

__all__ = [
    "attention_maps",
    "eval_sizes",
    "eval_transform",
    "extract_features",
    "knn_classify",
    "knn_predict",
    "linear_probe",
    "load_backbone",
    "save_attention_overlays",
    "save_backbone",
    "top_mass_mask",
]
