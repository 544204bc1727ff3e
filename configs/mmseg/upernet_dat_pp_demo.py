# UperNet with a small DAT++ on the bundled demo data (ADE20K layout, classes
# 'background', 'circle', 'square', 'triangle' stored as label values 1..4,
# 0 unused -> reduce_zero_label), CPU friendly: trains in a few minutes and
# reports mIoU. As it stands the backbone trains from scratch
# (init_cfg=None); tools/run_demo.sh starts it from the demo classifier's
# checkpoint (configs/mmpretrain/dat_pp_demo.py), the workflow of the full
# recipes with ImageNet weights, by a child config:
#   model = dict(backbone=dict(init_cfg=dict(
#       _delete_=True, type='Pretrained', checkpoint='<classifier>.pth',
#       prefix='backbone.')))
# (``_delete_`` because init_cfg is None here.)
#   python tools/dataset_converters/make_demo_data.py  # writes data/demo/
#   python tools/train.py configs/mmseg/upernet_dat_pp_demo.py
# Everything but the data, model size and schedule is inherited from the
# DAT-T++ UperNet recipe. Data elsewhere: edit ``data_root`` below (the value
# is copied into the datasets when the config is read, so pass
# ``train_dataloader.dataset.data_root=... val_dataloader.dataset.data_root=...
# test_dataloader.dataset.data_root=...`` with ``--cfg-options``).
_base_ = ['./upernet_dat_pp_t_160k_ade20k.py', '../_base_/dat_pp_demo_arch.py']

# mmdat.engine: the CPU wrappers, the checkpoint loader and the seed hook,
# also under `mim train/test`.
custom_imports = dict(imports=['mmdat', 'mmdat.engine'],
                      allow_failed_imports=False)
# Reproducible: a fixed seed (mmengine also seeds the dataloader workers from
# it) and the same random numbers per iteration after a resume.
randomness = dict(seed=0)
custom_hooks = [dict(type='IterationSeedHook')]

data_root = 'data/demo/ade/'
classes = ('background', 'circle', 'square', 'triangle')
# palette of tools/dataset_converters/make_demo_data.py
metainfo = dict(
    classes=classes,
    palette=[[120, 120, 120], [220, 40, 40], [40, 200, 40], [40, 80, 220]])
num_classes = len(classes)
crop_size = (128, 128)

# Small DAT++ (1.7M parameters in the trunk) and narrow heads; BN instead of
# SyncBN in the heads so that it runs without a process group.
pretrained = None
norm_cfg = dict(type='BN', requires_grad=True)
data_preprocessor = dict(size=crop_size)
model = dict(
    data_preprocessor=data_preprocessor,
    backbone=dict(
        arch=dict(_base_.dat_demo_arch, _delete_=True),
        drop_path_rate=0.0,
        with_cp=False,
        init_cfg=None),
    decode_head=dict(
        in_channels=[32, 64, 128, 256],
        channels=64,
        num_classes=num_classes,
        norm_cfg=norm_cfg),
    auxiliary_head=dict(
        in_channels=128,
        channels=32,
        num_classes=num_classes,
        norm_cfg=norm_cfg))

demo_dataset = dict(
    type='BaseSegDataset',
    data_root=data_root,
    metainfo=metainfo,
    img_suffix='.png',
    seg_map_suffix='.png',
    reduce_zero_label=True)
# Mild scale jitter and flips; no photometric distortion (its hue shifts
# would blur the class colours of this small set).
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(
        type='RandomResize',
        scale=crop_size,
        ratio_range=(0.9, 1.2),
        keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackSegInputs')
]
# Tested at the images' own size (112..144 px).
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale_factor=1.0),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs')
]
train_dataloader = dict(
    batch_size=4,
    num_workers=2,
    persistent_workers=False,
    dataset=dict(
        _delete_=True,
        **demo_dataset,
        data_prefix=dict(
            img_path='images/training', seg_map_path='annotations/training'),
        pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=1,
    num_workers=2,
    persistent_workers=False,
    dataset=dict(
        _delete_=True,
        **demo_dataset,
        data_prefix=dict(
            img_path='images/validation',
            seg_map_path='annotations/validation'),
        pipeline=test_pipeline))
test_dataloader = val_dataloader

# 240 iterations on the CPU (10 epochs of the 96 training images): plain
# fp32 AdamW, lr 4e-4, short warm-up, linear decay.
max_iters = 240
interval = 240
optim_wrapper = dict(type='OptimWrapper', optimizer=dict(lr=0.0004))
param_scheduler = [
    dict(
        type='LinearLR', start_factor=1e-3, by_epoch=False, begin=0, end=20),
    dict(
        type='PolyLR',
        eta_min=0.0,
        power=1.0,
        begin=20,
        end=max_iters,
        by_epoch=False)
]
train_cfg = dict(max_iters=max_iters, val_interval=interval)
default_hooks = dict(
    logger=dict(interval=20),
    checkpoint=dict(interval=max_iters),
    visualization=dict(draw=False))
del _base_.dat_demo_arch
