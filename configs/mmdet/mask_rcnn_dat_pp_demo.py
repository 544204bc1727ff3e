# Mask R-CNN with a small DAT++ on the bundled demo data (COCO layout, large
# shapes 'circle', 'square', 'triangle' in 112..144 px images), CPU friendly:
# trains in a few minutes and reports COCO bbox / segm mAP. As it stands the
# backbone trains from scratch (init_cfg=None); tools/run_demo.sh starts it
# from the demo classifier's checkpoint (configs/mmpretrain/dat_pp_demo.py),
# the workflow of the full recipes with ImageNet weights, by a child config:
#   model = dict(backbone=dict(init_cfg=dict(
#       _delete_=True, type='Pretrained', checkpoint='<classifier>.pth',
#       prefix='backbone.')))
# (``_delete_`` because init_cfg is None here.)
#   python tools/dataset_converters/make_demo_data.py  # writes data/demo/
#   python tools/train.py configs/mmdet/mask_rcnn_dat_pp_demo.py
# Everything but the data location, model size and schedule is inherited from
# the DAT-T++ 1x recipe. Data elsewhere: edit ``data_root`` below (the value
# is copied into the datasets and the evaluators when the config is read, so
# ``--cfg-options data_root=...`` alone does not move them; pass
# ``train_dataloader.dataset.data_root=... val_dataloader.dataset.data_root=...
# test_dataloader.dataset.data_root=... val_evaluator.ann_file=...
# test_evaluator.ann_file=...`` instead).
_base_ = ['./mask_rcnn_dat_pp_t_1x.py', '../_base_/dat_pp_demo_arch.py']

# mmdat.engine: the CPU wrappers, the checkpoint loader and the seed hook,
# also under `mim train/test`.
custom_imports = dict(imports=['mmdat', 'mmdat.engine'],
                      allow_failed_imports=False)
# Reproducible: a fixed seed (mmengine also seeds the dataloader workers from
# it) and the same random numbers per iteration after a resume.
randomness = dict(seed=0)
custom_hooks = [dict(type='IterationSeedHook')]

data_root = 'data/demo/coco/'
classes = ('circle', 'square', 'triangle')
metainfo = dict(classes=classes)
num_classes = len(classes)

# Small DAT++ (1.7M parameters in the trunk) and narrow neck / heads.
pretrained = None
model = dict(
    backbone=dict(
        arch=dict(_base_.dat_demo_arch, _delete_=True),
        drop_path_rate=0.0,
        with_cp=False,
        init_cfg=None),
    neck=dict(in_channels=[32, 64, 128, 256], out_channels=64),
    rpn_head=dict(in_channels=64, feat_channels=64),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=64),
        bbox_head=dict(
            in_channels=64, fc_out_channels=256, num_classes=num_classes),
        mask_roi_extractor=dict(out_channels=64),
        mask_head=dict(
            in_channels=64, conv_out_channels=64, num_classes=num_classes)),
    train_cfg=dict(
        rpn_proposal=dict(nms_pre=1000, max_per_img=300),
        rcnn=dict(sampler=dict(num=128))),
    test_cfg=dict(
        rpn=dict(nms_pre=300, max_per_img=100),
        rcnn=dict(max_per_img=20)))

# The images at their own size (objects of 40..72 px: no resizing blurs the
# edges the boxes and masks are measured against), flipped both ways.
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='Resize', scale_factor=1.0),
    dict(type='RandomFlip', prob=[0.25, 0.25],
         direction=['horizontal', 'vertical']),
    dict(type='PackDetInputs')
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale_factor=1.0),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(
        type='PackDetInputs',
        meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape',
                   'scale_factor'))
]
train_dataloader = dict(
    batch_size=4,
    num_workers=2,
    persistent_workers=False,
    dataset=dict(
        data_root=data_root,
        metainfo=metainfo,
        ann_file='annotations/instances_train.json',
        data_prefix=dict(img='train/'),
        pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=4,
    num_workers=2,
    persistent_workers=False,
    dataset=dict(
        data_root=data_root,
        metainfo=metainfo,
        ann_file='annotations/instances_val.json',
        data_prefix=dict(img='val/'),
        pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val.json')
test_evaluator = val_evaluator

# 6 epochs of 40 iterations (240) on the CPU: plain fp32 AdamW, lr 4e-4 (the
# recipe's 1e-4 is for 16 images and a long schedule), 40-iteration warm-up,
# one step (x0.1) for the last epoch. COCO bbox / segm mAP on the demo val
# set: about 0.85 / 0.93 from the demo classifier's weights (run_demo.sh),
# 0.83 / 0.90 from scratch (init_cfg=None, as here).
max_epochs = 6
train_cfg = dict(max_epochs=max_epochs, val_interval=max_epochs)
optim_wrapper = dict(type='OptimWrapper', optimizer=dict(lr=0.0004))
param_scheduler = [
    dict(
        type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=40),
    dict(
        type='MultiStepLR',
        begin=0,
        end=max_epochs,
        by_epoch=True,
        milestones=[5],
        gamma=0.1)
]
auto_scale_lr = dict(enable=False)
default_hooks = dict(
    logger=dict(interval=10),
    checkpoint=dict(interval=max_epochs),
    visualization=dict(draw=False))
del _base_.dat_demo_arch
