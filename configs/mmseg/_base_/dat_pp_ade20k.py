# Settings shared by the DAT++ ADE20K segmentors (UperNet, Semantic FPN):
# mmseg's ADE20K data (512x512 crops) and runtime, mmdat import, and the
# DAT-T++ backbone that the model configs next to this file plug in.
_base_ = [
    'mmseg::_base_/datasets/ade20k.py', 'mmseg::_base_/default_runtime.py'
]

# mmdat.engine: the torch >= 2.6 safe checkpoint loader and CPU fallbacks also
# under `mim train/test` (tools/train.py imports it by itself)
custom_imports = dict(
    imports=['mmdat', 'mmdat.engine'], allow_failed_imports=False)

# ImageNet-1k DAT-T++ weights converted to the mmpretrain layout by
#   python tools/model_converters/dat2mmdat.py <official dat_pp_t_in1k.pth> \
#       checkpoints/dat_pp_t_in1k.pth
# (keys ``backbone.*`` / ``head.*``; ``prefix='backbone.'`` keeps the trunk).
pretrained = 'checkpoints/dat_pp_t_in1k.pth'

dat_backbone = dict(
    type='DAT',
    arch='tiny',
    drop_path_rate=0.0,
    out_indices=(0, 1, 2, 3),
    init_cfg=dict(type='Pretrained', checkpoint=pretrained,
                  prefix='backbone.'))

# No weight decay for the position bias tables and the norms (official).
dat_paramwise_cfg = dict(
    custom_keys={
        'rpe_table': dict(decay_mult=0.),
        'relative_position_bias_table': dict(decay_mult=0.),
        'norm': dict(decay_mult=0.)
    })
