# RetinaNet whose neck is built from RepVGG blocks too (RepVGGFPN: every 3x3
# output conv and extra level is a type='RepVGGBlock'), so the deploy switch
# fuses backbone and neck.
_base_ = './retinanet_repvgg-a0_fpn_1x_coco.py'

model = dict(
    neck=dict(
        _delete_=True,
        type='RepVGGFPN',
        in_channels=[96, 192, 1280],
        out_channels=256,
        num_outs=5,
        block_cfg=dict(
            type='RepVGGBlock',
            norm_cfg=dict(type='BN', momentum=0.03, eps=0.001),
            act_cfg=dict(type='ReLU', inplace=True),
            without_branch_norm=False)))
