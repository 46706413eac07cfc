# The demo detector (retinanet_repvgg-tiny_repvgg-fpn_toy.py) with
# quantization-friendly QARepVGG blocks (Chu et al., arXiv 2212.01593) in the
# backbone and the RepVGGFPN neck; everything else (data, schedule, head) is
# inherited, so the two toy detectors compare the blocks alone.
_base_ = './retinanet_repvgg-tiny_repvgg-fpn_toy.py'

model = dict(
    backbone=dict(block_cfg=dict(type='QARepVGGBlock')),
    neck=dict(block_cfg=dict(type='QARepVGGBlock')))
