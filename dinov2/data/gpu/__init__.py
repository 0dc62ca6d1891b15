"""The device input pipeline (``data.pipeline=gpu``): DINOv2's multi-crop augmentation of whole ``uint8``
batches on the device, and the training stream that feeds it.

- :mod:`~dinov2.data.gpu.generators`: the per-batch ``torch.Generator`` every draw comes from;
- :mod:`~dinov2.data.gpu.geometry`: random-resized-crop boxes, flip, and the one-``grid_sample`` resampling;
- :mod:`~dinov2.data.gpu.colour`: colour jitter, grayscale, solarize;
- :mod:`~dinov2.data.gpu.blur`: per-image Gaussian blur;
- :mod:`~dinov2.data.gpu.multicrop`: :class:`GPUMultiCrop`, the per-crop recipe built from those;
- :mod:`~dinov2.data.gpu.decode`: a dataset decoded once into one ``uint8`` tensor;
- :mod:`~dinov2.data.gpu.loader`: :class:`GPUTrainLoader`, the resumable device stream with the CPU
  pipeline's samples and masks (a :class:`~dinov2.data.batches.TrainBatches`).
"""

from dinov2.data.gpu.blur import gaussian_blur, gaussian_kernels
from dinov2.data.gpu.colour import (
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    color_jitter,
    grayscale,
    hsv_to_rgb,
    jitter_params,
    rgb_to_hsv,
    solarize,
)
from dinov2.data.gpu.decode import decode_dataset
from dinov2.data.gpu.generators import batch_generator, device_generator
from dinov2.data.gpu.geometry import (
    central_box,
    crop_grid,
    random_resized_crop_boxes,
    resample_crops,
    supersample_factor,
)
from dinov2.data.gpu.loader import GPUTrainLoader, build_gpu_train_loader, collate_gpu
from dinov2.data.gpu.multicrop import GPUMultiCrop, as_nchw

__all__ = [
    "GPUMultiCrop",
    "GPUTrainLoader",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_hue",
    "adjust_saturation",
    "as_nchw",
    "batch_generator",
    "build_gpu_train_loader",
    "central_box",
    "collate_gpu",
    "color_jitter",
    "crop_grid",
    "decode_dataset",
    "device_generator",
    "gaussian_blur",
    "gaussian_kernels",
    "grayscale",
    "hsv_to_rgb",
    "jitter_params",
    "random_resized_crop_boxes",
    "resample_crops",
    "rgb_to_hsv",
    "solarize",
    "supersample_factor",
]
