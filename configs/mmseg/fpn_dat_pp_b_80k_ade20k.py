# Semantic FPN, DAT-B++. Official: 50.4 mIoU (51.1 multi-scale).
_base_ = ['./fpn_dat_pp_t_80k_ade20k.py']

# tools/model_converters/dat2mmdat.py applied to the official DAT-B++ weights.
pretrained = 'checkpoints/dat_pp_b_in1k.pth'
model = dict(
    backbone=dict(
        arch='base',
        drop_path_rate=0.7,
        init_cfg=dict(checkpoint=pretrained)),
    neck=dict(in_channels=[128, 256, 512, 1024]))
