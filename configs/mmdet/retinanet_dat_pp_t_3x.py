# RetinaNet, DAT-T++, 3x (36 epochs), DETR-style multi-scale training.
# Official: 49.2 box AP on COCO val2017.
_base_ = [
    './_base_/retinanet_dat_pp_t_fpn_coco.py',
    './_base_/schedule_dat_pp_3x.py'
]

model = dict(backbone=dict(drop_path_rate=0.2))
# RetinaNet: lr 5e-5 for 16 images (official 2e-4 for 64).
optim_wrapper = dict(optimizer=dict(lr=0.00005))
