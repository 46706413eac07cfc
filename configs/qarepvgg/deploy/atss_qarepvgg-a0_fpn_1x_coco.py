# Deploy twin of ../atss_qarepvgg-a0_fpn_1x_coco.py:
# every RepVGG module is built fused (deploy=True), so that a checkpoint
# written by tools/convert_deploy.py loads strictly:
#   python tools/test.py \
#       configs/qarepvgg/deploy/atss_qarepvgg-a0_fpn_1x_coco.py DEPLOY.pth
_base_ = '../atss_qarepvgg-a0_fpn_1x_coco.py'

model = dict(
    backbone=dict(deploy=True, init_cfg=None))
