# RetinaNet with a DAT-T++ backbone and FPN on COCO detection (model and data;
# the schedule comes from schedule_dat_pp_{1x,3x}.py).
_base_ = [
    'mmdet::_base_/models/retinanet_r50_fpn.py',
    'mmdet::_base_/datasets/coco_detection.py', './dat_pp_coco.py'
]

# RetinaNet works on strides 8..128 (P3-P7): the backbone returns stages 2-4
# only (the official model has no output norm on stage 1 either), FPN starts
# at its first input (start_level 0) and adds P6/P7 with convolutions on the
# last input ('on_input'), as mmdet's Swin RetinaNet. FPN has the same layers
# and weights as the official FPN(in_channels=dims, start_level=1).
model = dict(
    backbone=dict(_base_.dat_backbone, _delete_=True, out_indices=(1, 2, 3)),
    neck=dict(
        in_channels=[128, 256, 512],
        start_level=0,
        add_extra_convs='on_input',
        num_outs=5))

train_pipeline = [
    dict(type='LoadImageFromFile', backend_args=_base_.backend_args),
    dict(type='LoadAnnotations', with_bbox=True),
    *_base_.dat_detr_aug,
    dict(type='PackDetInputs')
]
train_dataloader = dict(dataset=dict(pipeline=train_pipeline))

del _base_.dat_backbone, _base_.dat_detr_aug
