# RetinaNet with a RepVGG-B1g2 backbone (groupwise 3x3 convs), 1x on COCO.
_base_ = './retinanet_repvgg-a0_fpn_1x_coco.py'

model = dict(
    backbone=dict(
        arch='B1g2',
        init_cfg=dict(checkpoint='checkpoints/repvgg-b1g2_in1k.pth')),
    neck=dict(in_channels=[256, 512, 2048]))
