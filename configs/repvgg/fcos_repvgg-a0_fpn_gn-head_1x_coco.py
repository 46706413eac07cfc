# FCOS with a RepVGG-A0 backbone, 1x on COCO (pytorch-style normalisation, as
# the RepVGG ImageNet weights were trained, not the caffe one of the base).
_base_ = 'mmdet::fcos/fcos_r50-caffe_fpn_gn-head_1x_coco.py'

custom_imports = dict(imports=['mmrepvgg'], allow_failed_imports=False)

model = dict(
    data_preprocessor=dict(
        mean=[123.675, 116.28, 103.53],
        std=[58.395, 57.12, 57.375],
        bgr_to_rgb=True),
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
