# Deploy twin of ../atss_repvgg-a0_fpn_neon-trees.py: every RepVGG module is
# built fused, so that a checkpoint of tools/convert_deploy.py loads strictly.
_base_ = '../atss_repvgg-a0_fpn_neon-trees.py'

model = dict(backbone=dict(deploy=True))
