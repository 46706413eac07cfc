# QARepVGG-A0 (quantization-friendly blocks, Chu et al., arXiv 2212.01593)
# ATSS on the NEON tree-crown tiles: ./atss_repvgg-a0_fpn_neon-trees.py
# with the block changed. Deploy twin: deploy/<same name>.
_base_ = './atss_repvgg-a0_fpn_neon-trees.py'

model = dict(backbone=dict(block_cfg=dict(type='QARepVGGBlock')))
