# DAT-T++ on ImageNet-1k, 224x224, with the Swin Transformer recipe (as the
# official code): AdamW lr 5e-4 per 512 images (1e-3 for 16 GPUs x 64),
# weight decay 0.05, 300 epochs, 20 warm-up epochs, cosine decay, gradient
# clipping at 5, RandAugment, mixup 0.8 / cutmix 1.0, random erasing 0.25,
# label smoothing 0.1, bicubic; test: resize 256 + centre crop 224.
# Official: 83.9 top-1, 23,962,876 parameters.
_base_ = [
    'mmpretrain::_base_/models/swin_transformer/tiny_224.py',
    'mmpretrain::_base_/datasets/imagenet_bs64_swin_224.py',
    'mmpretrain::_base_/schedules/imagenet_bs1024_adamw_swin.py',
    'mmpretrain::_base_/default_runtime.py'
]

custom_imports = dict(imports=['mmdat'], allow_failed_imports=False)

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
# biases and other 1-d parameters, as in the Swin recipe).
optim_wrapper = dict(
    paramwise_cfg=dict(custom_keys={'.rpe_table': dict(decay_mult=0.0)}),
    clip_grad=dict(max_norm=5.0))
