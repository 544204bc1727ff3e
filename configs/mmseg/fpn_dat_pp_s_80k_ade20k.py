# Semantic FPN, DAT-S++. Official: 49.9 mIoU (50.7 multi-scale).
_base_ = ['./fpn_dat_pp_t_80k_ade20k.py']

# tools/model_converters/dat2mmdat.py applied to the official DAT-S++ weights.
pretrained = 'checkpoints/dat_pp_s_in1k.pth'
model = dict(
    backbone=dict(
        arch='small',
        drop_path_rate=0.4,
        init_cfg=dict(checkpoint=pretrained)),
    neck=dict(in_channels=[96, 192, 384, 768]))
