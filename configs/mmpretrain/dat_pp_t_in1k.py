# DAT-T++ on ImageNet-1k, 224x224, with the Swin Transformer recipe (as the
# official code): AdamW lr 5e-4 per 512 images (1e-3 for 16 GPUs x 64),
# weight decay 0.05, 300 epochs, 20 warm-up epochs, cosine decay, gradient
# clipping at 5, RandAugment, mixup 0.8 / cutmix 1.0, random erasing 0.25,
# label smoothing 0.1, bicubic, mixed precision; test: resize to 256x256 +
# centre crop 224.
# Official: 83.9 top-1, 23,962,876 parameters.
_base_ = [
    'mmpretrain::_base_/models/swin_transformer/tiny_224.py',
    'mmpretrain::_base_/datasets/imagenet_bs64_swin_224.py',
    'mmpretrain::_base_/schedules/imagenet_bs1024_adamw_swin.py',
    'mmpretrain::_base_/default_runtime.py'
]

# mmdat.engine: the torch >= 2.6 safe checkpoint loader and CPU fallbacks also
# under `mim train/test` (tools/train.py imports it by itself)
custom_imports = dict(
    imports=['mmdat', 'mmdat.engine'], allow_failed_imports=False)

model = dict(
    # out_indices=(3,): the last stage, with the classifier's final LayerNorm
    # as its output norm, then global average pooling and the linear head.
    backbone=dict(
        _delete_=True,
        type='DAT',
        arch='tiny',
        img_size=224,
        out_indices=(3, ),
        drop_path_rate=0.2),
    head=dict(in_channels=512),
    # The official code keeps PyTorch's default initialisation (its
    # reset_parameters() does nothing), not Swin's truncated normal one.
    init_cfg=None)

# No weight decay for the deformable position bias tables (besides the norms,
# biases and other 1-d parameters, as in the Swin recipe). Mixed precision:
# the official runs were launched with --amp (train.sh).
optim_wrapper = dict(
    type='AmpOptimWrapper',
    paramwise_cfg=dict(custom_keys={'.rpe_table': dict(decay_mult=0.0)}),
    clip_grad=dict(max_norm=5.0))

# Test: the official code resizes to a 256x256 square (bicubic), then crops
# the central 224x224 (not a short-side resize).
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(
        type='Resize',
        scale=(256, 256),
        backend='pillow',
        interpolation='bicubic'),
    dict(type='CenterCrop', crop_size=224),
    dict(type='PackInputs'),
]
val_dataloader = dict(dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader

# lr 1e-3 is for 1024 images per iteration (16 GPUs x 64; the official rule
# is 5e-4 per 512). On 8 GPUs x 64 = 512 images, or any other total batch
# size, pass `--auto-scale-lr` to tools/train.py: the lr is scaled by
# (GPUs x train_dataloader.batch_size) / 1024 (the schedules' eta_min is not).
auto_scale_lr = dict(enable=False, base_batch_size=1024)
