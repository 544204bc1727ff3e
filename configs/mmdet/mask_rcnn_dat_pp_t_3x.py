# Mask R-CNN, DAT-T++, 3x (36 epochs), DETR-style multi-scale training.
# Official: 50.5 box AP / 45.1 mask AP on COCO val2017.
_base_ = [
    './_base_/mask_rcnn_dat_pp_t_fpn_coco.py',
    './_base_/schedule_dat_pp_3x.py'
]

model = dict(backbone=dict(drop_path_rate=0.3))
