# DAT-S++ on ImageNet-1k, 224x224, same recipe as DAT-T++.
# Official: 84.6 top-1, 53,127,366 parameters.
_base_ = ['./dat_pp_t_in1k.py']

model = dict(
    backbone=dict(arch='small', drop_path_rate=0.4),
    head=dict(in_channels=768))
