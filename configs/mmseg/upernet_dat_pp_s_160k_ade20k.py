# UperNet, DAT-S++, 160k. Official: 50.5 mIoU (51.2 multi-scale).
_base_ = ['./upernet_dat_pp_t_160k_ade20k.py']

# tools/model_converters/dat2mmdat.py applied to the official DAT-S++ weights.
pretrained = 'checkpoints/dat_pp_s_in1k.pth'
model = dict(
    backbone=dict(
        arch='small',
        drop_path_rate=0.5,
        init_cfg=dict(checkpoint=pretrained)),
    decode_head=dict(in_channels=[96, 192, 384, 768]),
    auxiliary_head=dict(in_channels=384))
