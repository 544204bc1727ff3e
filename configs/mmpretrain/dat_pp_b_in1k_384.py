# DAT-B++ fine-tuned on ImageNet-1k at 384x384 from the 224 model: 30 epochs,
# AdamW lr 2e-5 per 512 images, weight decay 1e-8, no warm-up, cosine decay,
# drop path 0.6, otherwise the 224 recipe; test: resize to 384x384, no crop.
# Official: 85.9 top-1.
_base_ = ['./dat_pp_b_in1k.py']

# tools/model_converters/dat2mmdat.py applied to the official DAT-B++ 224
# weights (mmpretrain layout, so the whole classifier is loaded).
pretrained = 'checkpoints/dat_pp_b_in1k.pth'
load_from = pretrained

# img_size stays 224: the official 384 model keeps the position bias tables
# of the 224 model (its config sets img_size 224 and only the data size to
# 384), so the 224 weights load as they are and so do the published 384 ones.
model = dict(backbone=dict(img_size=224, drop_path_rate=0.6))

img_size = 384
train_pipeline = [
    dict(t, scale=img_size) if t['type'] == 'RandomResizedCrop' else t
    for t in _base_.train_pipeline
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
train_dataloader = dict(dataset=dict(pipeline=train_pipeline))
val_dataloader = dict(dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader

max_epochs = 30
optim_wrapper = dict(optimizer=dict(lr=2e-5 * 1024 / 512, weight_decay=1e-8))
param_scheduler = [
    dict(
        type='CosineAnnealingLR',
        eta_min=2e-7 * 1024 / 512,
        by_epoch=True,
        begin=0,
        end=max_epochs,
        convert_to_iter_based=True)
]
train_cfg = dict(max_epochs=max_epochs)
