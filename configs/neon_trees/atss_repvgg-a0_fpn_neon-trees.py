# RepVGG-A0 ATSS on the NEON tree-crown tiles, from scratch.
# Data: python tools/dataset_converters/neon_tree_crowns.py
# Deploy twin: deploy/<same name>.
_base_ = '../_base_/atss_fpn_neon-trees.py'

model = dict(
    backbone=dict(
        _delete_=True,
        type='RepVGG',
        arch='A0',
        out_indices=(1, 2, 3),
        norm_cfg=dict(type='BN', requires_grad=True),
        init_cfg=None),
    neck=dict(in_channels=[96, 192, 1280]))
