"""dinov2: self-supervised ViT pretraining the DINOv2 way on current PyTorch.

Importing the package does no work; subpackages are imported on use (``dinov2.models``,
``dinov2.train``, ``dinov2.data`` …).
"""

__version__ = "0.1.0"
