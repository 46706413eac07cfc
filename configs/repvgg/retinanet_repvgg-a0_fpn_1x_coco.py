# RetinaNet with a RepVGG-A0 backbone, 1x schedule on COCO.
# Pretrained ImageNet weights: convert them once with
#   python tools/model_converters/import_checkpoint.py RepVGG-A0-train.pth checkpoints/repvgg-a0_in1k.pth
# (official, mmpretrain or timm formats). Deploy twin: deploy/<same name>.
_base_ = 'mmdet::retinanet/retinanet_r50_fpn_1x_coco.py'

custom_imports = dict(imports=['mmrepvgg'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        _delete_=True,
        type='RepVGG',
        arch='A0',
        out_indices=(1, 2, 3),
        frozen_stages=1,
        norm_cfg=dict(type='BN', requires_grad=True),
        norm_eval=True,
        init_cfg=dict(
            type='Pretrained', checkpoint='checkpoints/repvgg-a0_in1k.pth')),
    neck=dict(in_channels=[96, 192, 1280], start_level=0))

# Checkpoints are written atomically (temporary file, fsync, rename; old ones
# removed only after the new one is complete): see mmrepvgg.engine.
default_hooks = dict(checkpoint=dict(type='AtomicCheckpointHook'))
