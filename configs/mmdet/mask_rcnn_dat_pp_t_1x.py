# Mask R-CNN, DAT-T++, 1x (12 epochs), DETR-style multi-scale training.
# Official: 48.7 box AP / 43.7 mask AP on COCO val2017.
_base_ = [
    './_base_/mask_rcnn_dat_pp_t_fpn_coco.py',
    './_base_/schedule_dat_pp_1x.py'
]

model = dict(backbone=dict(drop_path_rate=0.0))
