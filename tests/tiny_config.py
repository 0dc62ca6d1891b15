"""Overrides that shrink any training config to a model and data set that step in milliseconds on CPU."""

TINY_MODEL = [
    "model.arch=vit_small",
    "model.embed_dim=32",
    "model.depth=2",
    "model.num_heads=2",
    "model.patch_size=4",
    "model.img_size=16",
    "model.layerscale_init=0.1",
    "dino_head.out_dim=64",
    "dino_head.hidden_dim=32",
    "dino_head.bottleneck_dim=16",
]

# a separate iBOT head (the configs above share the DINO head): TINY's DINO head sizes and init
SEPARATE_IBOT_HEAD = [
    "ibot_head.out_dim=64",
    "ibot_head.hidden_dim=32",
    "ibot_head.bottleneck_dim=16",
    "ibot_head.mlp_init=fan_in",
]

TINY_DATA = [
    "data.dataset.kind=demo",
    "data.dataset.path=''",  # generated images, whatever folder the preset names
    "data.dataset.demo_num_train=128",
    "data.dataset.demo_num_test=64",
    "data.dataset.demo_image_size=16",
    "data.crops.global_crops_size=16",
    "data.crops.local_crops_size=8",
    "data.crops.local_crops_number=2",
    "data.batch_size_per_gpu=8",
    "data.num_workers=0",
]

TINY_TRAIN = [
    "optim.epochs=1",
    "optim.epoch_length=8",
    "optim.warmup_epochs=0.25",
    "loss.warmup_teacher_temp_epochs=0.5",
    "optim.freeze_last_layer_epochs=0.25",
    "train.progress=false",
    "train.tensorboard=false",
    "train.log_every=1",
]

TINY = TINY_MODEL + TINY_DATA + TINY_TRAIN
