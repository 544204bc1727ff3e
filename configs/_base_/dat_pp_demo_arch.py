# The small DAT++ of the three demo configs (1.7M parameters in the trunk),
# trained from scratch on the bundled demo data.
dat_demo_arch = dict(
    dim_stem=32,
    dims=[32, 64, 128, 256],
    depths=[1, 1, 2, 1],
    stage_spec=[['D'], ['D'], ['N', 'D'], ['D']],
    heads=[1, 2, 4, 8],
    groups=[1, 1, 2, 4])
