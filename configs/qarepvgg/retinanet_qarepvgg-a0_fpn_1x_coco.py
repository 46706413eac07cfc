# RetinaNet with a QARepVGG-A0 backbone (quantization-friendly RepVGG blocks,
# Chu et al., arXiv 2212.01593), 1x schedule on COCO: pick this block when the
# detector will be deployed in INT8. Same detector as
# ../repvgg/retinanet_repvgg-a0_fpn_1x_coco.py; only the block changes.
# Deploy twin: deploy/<same name> (the fused blocks are plain 3x3 convs, as
# for RepVGG).
#
# Pretrained weights: QARepVGG ImageNet weights are not published in a layout
# tools/model_converters/import_checkpoint.py maps (it refuses QARepVGG checkpoints); the file
# below must hold this backbone's own state dict, i.e. of
# RepVGG(arch='A0', block_cfg=dict(type='QARepVGGBlock')), e.g. from an
# ImageNet pre-training with it. Set init_cfg=None to start from scratch
# (then use a longer schedule).
_base_ = '../repvgg/retinanet_repvgg-a0_fpn_1x_coco.py'

model = dict(
    backbone=dict(
        block_cfg=dict(type='QARepVGGBlock'),
        init_cfg=dict(
            type='Pretrained',
            checkpoint='checkpoints/qarepvgg-a0_in1k.pth')))
