# ATSS with a QARepVGG-A0 backbone (quantization-friendly RepVGG blocks,
# Chu et al., arXiv 2212.01593), 1x on COCO. Same detector as
# ../repvgg/atss_repvgg-a0_fpn_1x_coco.py; only the block changes.
# Pretrained weights: see retinanet_qarepvgg-a0_fpn_1x_coco.py.
_base_ = '../repvgg/atss_repvgg-a0_fpn_1x_coco.py'

model = dict(
    backbone=dict(
        block_cfg=dict(type='QARepVGGBlock'),
        init_cfg=dict(
            type='Pretrained',
            checkpoint='checkpoints/qarepvgg-a0_in1k.pth')))
