# RetinaNet, DAT-S++, 1x. Official: 48.3 box AP.
_base_ = ['./retinanet_dat_pp_t_1x.py']

# tools/model_converters/dat2mmdat.py applied to the official DAT-S++ weights.
pretrained = 'checkpoints/dat_pp_s_in1k.pth'
model = dict(
    backbone=dict(
        arch='small',
        drop_path_rate=0.1,
        init_cfg=dict(checkpoint=pretrained)),
    neck=dict(in_channels=[192, 384, 768]))
