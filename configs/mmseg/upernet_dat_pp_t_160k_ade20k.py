# UperNet, DAT-T++, 160k iterations of 16 images (8 GPUs x 2), 512x512 crops.
# Official: 49.4 mIoU (50.3 multi-scale) on ADE20K val.
_base_ = [
    'mmseg::_base_/models/upernet_swin.py', './_base_/dat_pp_ade20k.py',
    'mmseg::_base_/schedules/schedule_160k.py'
]

crop_size = (512, 512)
data_preprocessor = dict(size=crop_size)
model = dict(
    data_preprocessor=data_preprocessor,
    # The official UperNet runs checkpointed stages.
    backbone=dict(
        _base_.dat_backbone, _delete_=True, drop_path_rate=0.3, with_cp=True),
    decode_head=dict(in_channels=[64, 128, 256, 512], num_classes=150),
    # auxiliary FCN head on stage 3 (in_index 2)
    auxiliary_head=dict(in_channels=256, in_index=2, num_classes=150))

# AdamW, lr 6e-5, weight decay 0.01, mixed precision (as the official T++
# and S++ runs; B++ overrides it with fp32).
optim_wrapper = dict(
    _delete_=True,
    type='AmpOptimWrapper',
    optimizer=dict(
        type='AdamW', lr=0.00006, betas=(0.9, 0.999), weight_decay=0.01),
    paramwise_cfg=_base_.dat_paramwise_cfg)

# 1500-iteration linear warm-up, then poly decay (power 1) to 0.
param_scheduler = [
    dict(
        type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=1500),
    dict(
        type='PolyLR',
        eta_min=0.0,
        power=1.0,
        begin=1500,
        end=160000,
        by_epoch=False,
    )
]

# By default, models are trained on 8 GPUs with 2 images per GPU
train_dataloader = dict(batch_size=2)
# lr 6e-5 is for 16 images per iteration (official). With another total
# batch size pass `--auto-scale-lr` to tools/train.py: the lr is scaled by
# (GPUs x train_dataloader.batch_size) / 16.
auto_scale_lr = dict(enable=False, base_batch_size=16)
val_dataloader = dict(batch_size=1)
test_dataloader = val_dataloader

del _base_.dat_backbone, _base_.dat_paramwise_cfg
