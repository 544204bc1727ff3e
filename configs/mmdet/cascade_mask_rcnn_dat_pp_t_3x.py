# Cascade Mask R-CNN (4conv1fc GIoU heads), DAT-T++, 3x (36 epochs),
# DETR-style multi-scale training. Official: 53.0 box AP / 46.0 mask AP.
_base_ = [
    './_base_/cascade_mask_rcnn_dat_pp_t_fpn_coco.py',
    './_base_/schedule_dat_pp_3x.py'
]

model = dict(backbone=dict(drop_path_rate=0.1))
