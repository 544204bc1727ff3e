# Image classification with a small DAT++ on the bundled demo data (ImageNet
# layout, 64x64 crops of 'circle', 'square', 'triangle', 'cross'), CPU
# friendly: trains from scratch in under a minute and reports top-1 accuracy.
# In tools/run_demo.sh this is the workflow's "ImageNet pretraining": the demo
# UperNet and Mask R-CNN start their backbones from its checkpoint.
#   python tools/dataset_converters/make_demo_data.py  # writes data/demo/
#   python tools/train.py configs/mmpretrain/dat_pp_demo.py
# Everything but the data, model size and schedule is inherited from the
# DAT-T++ ImageNet recipe. Data elsewhere: edit ``data_root`` below (the value
# is copied into the datasets when the config is read, so pass
# ``train_dataloader.dataset.data_root=... val_dataloader.dataset.data_root=...
# test_dataloader.dataset.data_root=...`` with ``--cfg-options``).
_base_ = ['./dat_pp_t_in1k.py', '../_base_/dat_pp_demo_arch.py']

# mmdat.engine: the CPU wrappers, the checkpoint loader and the seed hook,
# also under `mim train/test`.
custom_imports = dict(imports=['mmdat', 'mmdat.engine'],
                      allow_failed_imports=False)
# Reproducible: a fixed seed (mmengine also seeds the dataloader workers from
# it) and the same random numbers per iteration after a resume.
randomness = dict(seed=0)
custom_hooks = [dict(type='IterationSeedHook')]

data_root = 'data/demo/imagenet/'
classes = ('circle', 'square', 'triangle', 'cross')
metainfo = dict(classes=classes)
num_classes = len(classes)
img_size = 64

# Small DAT++ (1.7M parameters in the trunk), trained from scratch; no
# mixup / cutmix on this tiny 4-class set.
model = dict(
    backbone=dict(
        arch=dict(_base_.dat_demo_arch, _delete_=True),
        drop_path_rate=0.1),
    head=dict(in_channels=256, num_classes=num_classes, topk=(1, )),
    train_cfg=None)
data_preprocessor = dict(num_classes=num_classes)

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(
        type='RandomResizedCrop',
        scale=img_size,
        crop_ratio_range=(0.5, 1.0),
        backend='pillow',
        interpolation='bicubic'),
    dict(type='RandomFlip', prob=0.5, direction='horizontal'),
    dict(type='PackInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(
        type='Resize',
        scale=img_size,
        backend='pillow',
        interpolation='bicubic'),
    dict(type='PackInputs'),
]
train_dataloader = dict(
    batch_size=16,
    num_workers=2,
    persistent_workers=False,
    dataset=dict(
        _delete_=True,
        type='CustomDataset',
        data_root=data_root,
        ann_file='meta/train.txt',
        data_prefix='train',
        metainfo=metainfo,
        pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=16,
    num_workers=2,
    persistent_workers=False,
    dataset=dict(
        _delete_=True,
        type='CustomDataset',
        data_root=data_root,
        ann_file='meta/val.txt',
        data_prefix='val',
        metainfo=metainfo,
        pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(type='Accuracy', topk=(1, ))
test_evaluator = val_evaluator

# 6 epochs of 12 iterations on the CPU: plain fp32 AdamW, lr 1e-3, one
# warm-up epoch, cosine decay.
max_epochs = 6
optim_wrapper = dict(type='OptimWrapper', optimizer=dict(lr=0.001))
param_scheduler = [
    dict(
        type='LinearLR',
        start_factor=1e-3,
        by_epoch=True,
        end=1,
        convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', eta_min=1e-5, by_epoch=True, begin=1)
]
train_cfg = dict(max_epochs=max_epochs, val_interval=max_epochs)
# Painted test predictions (tools/test.py --show-dir) 3x larger than the
# 64 px crops, so that the printed labels can be read.
default_hooks = dict(
    logger=dict(interval=6),
    checkpoint=dict(interval=max_epochs),
    visualization=dict(rescale_factor=3.0))
auto_scale_lr = dict(base_batch_size=16)
del _base_.dat_demo_arch
