# The demo detector (retinanet_repvgg-tiny_repvgg-fpn_toy.py) with
# quantization-friendly QARepVGG blocks (Chu et al., arXiv 2212.01593) in the
# backbone and the RepVGGFPN neck; data, schedule and head are inherited.
#
# Two training settings compensate for what a QARepVGG block lacks compared
# with a RepVGG block in this 288-iteration schedule (mean mAP over 6 seeds
# with tools/analysis_tools/seed_sweep.py, see the README): a RepVGG block's per-channel
# output affine is the sum of three batch-norm affines (3x3, 1x1, identity),
# so the optimizer moves it about 3x faster than QARepVGG's single post-sum
# norm (hence lr_mult=3 on post_norm), and its initial output is about
# sqrt(3) larger, which matters where the neck feeds the RetinaNet head (no
# normalization) directly (hence post_norm_init=sqrt(3) in the neck).
# Neither changes the fused model.
_base_ = './retinanet_repvgg-tiny_repvgg-fpn_toy.py'

model = dict(
    backbone=dict(block_cfg=dict(type='QARepVGGBlock')),
    neck=dict(
        block_cfg=dict(type='QARepVGGBlock', post_norm_init=3**0.5)))
optim_wrapper = dict(
    paramwise_cfg=dict(custom_keys=dict(post_norm=dict(lr_mult=3.0))))
