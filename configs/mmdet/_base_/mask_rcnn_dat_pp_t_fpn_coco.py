# Mask R-CNN with a DAT-T++ backbone and FPN on COCO instance segmentation
# (model and data; the schedule comes from schedule_dat_pp_{1x,3x}.py).
_base_ = [
    'mmdet::_base_/models/mask-rcnn_r50_fpn.py',
    'mmdet::_base_/datasets/coco_instance.py', './dat_pp_coco.py'
]

model = dict(
    backbone=dict(_base_.dat_backbone, _delete_=True),
    # FPN on all four stage outputs (start_level 0, mmdet's default); as in
    # the official model, P6 is a stride-2 conv on C5 ('on_input', weights
    # neck.fpn_convs.4.conv.*), not mmdet's default max-pool of P5.
    neck=dict(in_channels=[64, 128, 256, 512], add_extra_convs='on_input'))

train_pipeline = [
    dict(type='LoadImageFromFile', backend_args=_base_.backend_args),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    *_base_.dat_detr_aug,
    dict(type='PackDetInputs')
]
train_dataloader = dict(dataset=dict(pipeline=train_pipeline))

del _base_.dat_backbone, _base_.dat_detr_aug
