# Cascade Mask R-CNN, DAT-S++, 3x. Official: 54.2 box AP / 46.9 mask AP.
_base_ = ['./cascade_mask_rcnn_dat_pp_t_3x.py']

# tools/model_converters/dat2mmdat.py applied to the official DAT-S++ weights.
pretrained = 'checkpoints/dat_pp_s_in1k.pth'
model = dict(
    backbone=dict(
        arch='small',
        drop_path_rate=0.5,
        init_cfg=dict(checkpoint=pretrained)),
    neck=dict(in_channels=[96, 192, 384, 768]))

# The official run trained in fp32 (OptimizerHook, fp16=None), unlike the
# other DAT++ detectors: a plain OptimWrapper.
optim_wrapper = dict(type='OptimWrapper')
