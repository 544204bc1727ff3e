# UperNet, DAT-B++, 160k. Official: 51.0 mIoU (51.5 multi-scale).
_base_ = ['./upernet_dat_pp_t_160k_ade20k.py']

# tools/model_converters/dat2mmdat.py applied to the official DAT-B++ weights.
pretrained = 'checkpoints/dat_pp_b_in1k.pth'
model = dict(
    backbone=dict(
        arch='base',
        drop_path_rate=0.7,
        init_cfg=dict(checkpoint=pretrained)),
    decode_head=dict(in_channels=[128, 256, 512, 1024]),
    auxiliary_head=dict(in_channels=512))

# The official UperNet B++ run trained in fp32 (no fp16 settings, unlike T++
# and S++): a plain OptimWrapper.
optim_wrapper = dict(type='OptimWrapper')
