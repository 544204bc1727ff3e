# DAT-B++ on ImageNet-1k, 224x224, same recipe as DAT-T++.
# Official: 84.9 top-1, 93,690,640 parameters.
_base_ = ['./dat_pp_t_in1k.py']

model = dict(
    backbone=dict(arch='base', drop_path_rate=0.7),
    head=dict(in_channels=1024))
