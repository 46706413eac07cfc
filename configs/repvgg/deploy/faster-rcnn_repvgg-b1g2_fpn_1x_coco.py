# Deploy twin of ../faster-rcnn_repvgg-b1g2_fpn_1x_coco.py:
# every RepVGG module is built fused (deploy=True), so that a checkpoint
# written by tools/convert_deploy.py loads strictly:
#   python tools/test.py configs/repvgg/deploy/faster-rcnn_repvgg-b1g2_fpn_1x_coco.py DEPLOY.pth
_base_ = '../faster-rcnn_repvgg-b1g2_fpn_1x_coco.py'

model = dict(
    backbone=dict(deploy=True, init_cfg=None))
