# The baseline: mmdet's own ResNet-18 in the same ATSS detector, data and
# schedule as ./atss_repvgg-a0_fpn_neon-trees.py, from scratch. It has
# no multi-branch blocks, so no deploy twin: its deploy form is itself.
_base_ = '../_base_/atss_fpn_neon-trees.py'

model = dict(
    backbone=dict(
        _delete_=True,
        type='ResNet',
        depth=18,
        num_stages=4,
        out_indices=(1, 2, 3),
        frozen_stages=-1,
        norm_cfg=dict(type='BN', requires_grad=True),
        norm_eval=False,
        style='pytorch',
        init_cfg=None),
    neck=dict(in_channels=[128, 256, 512]))
