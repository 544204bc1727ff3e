# Cascade Mask R-CNN, DAT-B++, 3x. Official: 54.5 box AP / 47.0 mask AP.
_base_ = ['./cascade_mask_rcnn_dat_pp_t_3x.py']

# tools/model_converters/dat2mmdat.py applied to the official DAT-B++ weights.
pretrained = 'checkpoints/dat_pp_b_in1k.pth'
model = dict(
    backbone=dict(
        arch='base',
        drop_path_rate=0.8,
        init_cfg=dict(checkpoint=pretrained)),
    neck=dict(in_channels=[128, 256, 512, 1024]))

# The official run trained in fp32 (OptimizerHook, fp16=None), unlike the
# other DAT++ detectors: a plain OptimWrapper.
optim_wrapper = dict(type='OptimWrapper')
