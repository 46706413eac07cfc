# QARepVGG-A0 (quantization-friendly blocks, Chu et al., arXiv 2212.01593)
# RetinaNet on the NEON tree-crown tiles: ./retinanet_repvgg-a0_fpn_neon-trees.py
# with the block changed. Deploy twin: deploy/<same name>.
_base_ = './retinanet_repvgg-a0_fpn_neon-trees.py'

model = dict(backbone=dict(block_cfg=dict(type='QARepVGGBlock')))
