# Settings shared by every DAT++ COCO detector (Mask R-CNN, Cascade Mask
# R-CNN, RetinaNet), following the official DAT-Detection recipe.
# The detector bases next to this file turn the two variables below into
# their model / pipeline and then drop them again.
_base_ = ['mmdet::_base_/default_runtime.py']

# mmdat.engine: the torch >= 2.6 safe checkpoint loader and CPU fallbacks also
# under `mim train/test` (tools/train.py imports it by itself)
custom_imports = dict(
    imports=['mmdat', 'mmdat.engine'], allow_failed_imports=False)

# ImageNet-1k DAT-T++ weights converted to the mmpretrain layout by
#   python tools/model_converters/dat2mmdat.py <official dat_pp_t_in1k.pth> \
#       checkpoints/dat_pp_t_in1k.pth
# (keys ``backbone.*`` / ``head.*``; ``prefix='backbone.'`` keeps the trunk).
pretrained = 'checkpoints/dat_pp_t_in1k.pth'

# DAT-T++ trunk; ``with_cp``: the official detectors checkpoint every stage.
dat_backbone = dict(
    type='DAT',
    arch='tiny',
    drop_path_rate=0.0,
    out_indices=(0, 1, 2, 3),
    with_cp=True,
    init_cfg=dict(type='Pretrained', checkpoint=pretrained,
                  prefix='backbone.'))

# DETR-style multi-scale augmentation (used for the 1x and the 3x schedules):
# random flip, then either resize the short side to 480..800 (step 32, long
# side <= 1333), or resize to 400/500/600, crop 384..600 and resize as before.
dat_detr_aug = [
    dict(type='RandomFlip', prob=0.5),
    dict(
        type='RandomChoice',
        transforms=[[
            dict(
                type='RandomChoiceResize',
                scales=[(480, 1333), (512, 1333), (544, 1333), (576, 1333),
                        (608, 1333), (640, 1333), (672, 1333), (704, 1333),
                        (736, 1333), (768, 1333), (800, 1333)],
                keep_ratio=True)
        ],
                    [
                        dict(
                            type='RandomChoiceResize',
                            scales=[(400, 1333), (500, 1333), (600, 1333)],
                            keep_ratio=True),
                        dict(
                            type='RandomCrop',
                            crop_type='absolute_range',
                            crop_size=(384, 600),
                            allow_negative_crop=True),
                        dict(
                            type='RandomChoiceResize',
                            scales=[(480, 1333), (512, 1333), (544, 1333),
                                    (576, 1333), (608, 1333), (640, 1333),
                                    (672, 1333), (704, 1333), (736, 1333),
                                    (768, 1333), (800, 1333)],
                            keep_ratio=True)
                    ]]),
]
