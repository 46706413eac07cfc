# ATSS for the NEON tree-crown tiles (tools/dataset_converters/
# neon_tree_crowns.py): one class, crowns 12-93 px at 10 cm per pixel, tiles
# of 400x400 px, trained from scratch on the CPU (no pretrained weights can
# be fetched). The configs in configs/neon_trees/ set only the backbone and
# the neck's input channels, so RepVGG-A0, QARepVGG-A0 and ResNet-18 share
# neck, head, data, augmentation and schedule. ATSS rather than RetinaNet:
# see docs/real_images.md (one 36-epoch probe of each).
_base_ = [
    'mmdet::_base_/models/retinanet_r50_fpn.py',  # + ATSS head below
    'mmdet::_base_/default_runtime.py'
]

custom_imports = dict(imports=['mmrepvgg'], allow_failed_imports=False)

data_root = 'data/neon_trees/'
classes = ('tree', )
tile = 400  # the converter's --tile
crop = 256  # training crops

model = dict(
    type='ATSS',
    # P3-P5 (strides 8, 16, 32): anchors of 32-128 px; ATSS picks each
    # crown's positives by centre distance and IoU statistics
    neck=dict(out_channels=128, start_level=0, add_extra_convs=False,
              num_outs=3),
    bbox_head=dict(
        _delete_=True,
        type='ATSSHead',
        num_classes=len(classes),
        in_channels=128,
        feat_channels=128,
        stacked_convs=2,
        anchor_generator=dict(type='AnchorGenerator', ratios=[1.0],
                              octave_base_scale=4, scales_per_octave=1,
                              strides=[8, 16, 32]),
        bbox_coder=dict(type='DeltaXYWHBBoxCoder',
                        target_means=[.0, .0, .0, .0],
                        target_stds=[0.1, 0.1, 0.2, 0.2]),
        loss_cls=dict(type='FocalLoss', use_sigmoid=True, gamma=2.0,
                      alpha=0.25, loss_weight=1.0),
        loss_bbox=dict(type='GIoULoss', loss_weight=2.0),
        loss_centerness=dict(type='CrossEntropyLoss', use_sigmoid=True,
                             loss_weight=1.0)),
    train_cfg=dict(_delete_=True, assigner=dict(type='ATSSAssigner', topk=9),
                   allowed_border=-1, pos_weight=-1, debug=False),
    test_cfg=dict(score_thr=0.05, nms=dict(type='nms', iou_threshold=0.6),
                  max_per_img=200))

backend_args = None
# Aerial views have no up: every flip and transpose is a valid view; scale
# jitter and photometric changes stand in for other sites and seasons.
train_pipeline = [
    dict(type='LoadImageFromFile', backend_args=backend_args),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='RandomResize', scale=(tile, tile), ratio_range=(0.8, 1.25),
         keep_ratio=True),
    dict(type='RandomCrop', crop_size=(crop, crop)),
    dict(type='RandomFlip', prob=[0.25, 0.25, 0.25],
         direction=['horizontal', 'vertical', 'diagonal']),
    dict(type='PhotoMetricDistortion', brightness_delta=24,
         contrast_range=(0.75, 1.25), saturation_range=(0.75, 1.25),
         hue_delta=8),
    dict(type='PackDetInputs')
]
test_pipeline = [
    dict(type='LoadImageFromFile', backend_args=backend_args),
    dict(type='Resize', scale=(tile, tile), keep_ratio=True),  # tiles: as is
    dict(type='LoadAnnotations', with_bbox=True),
    dict(
        type='PackDetInputs',
        meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape',
                   'scale_factor'))
]
train_dataloader = dict(
    batch_size=8,
    num_workers=0,
    persistent_workers=False,
    sampler=dict(type='DefaultSampler', shuffle=True),
    batch_sampler=None,
    dataset=dict(
        type='CocoDataset',
        data_root=data_root,
        metainfo=dict(classes=classes),
        ann_file='annotations/train.json',
        data_prefix=dict(img='train/'),
        filter_cfg=dict(filter_empty_gt=True, min_size=2),
        pipeline=train_pipeline,
        backend_args=backend_args))
val_dataloader = dict(
    batch_size=8,
    num_workers=0,
    persistent_workers=False,
    drop_last=False,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(
        type='CocoDataset',
        data_root=data_root,
        metainfo=dict(classes=classes),
        ann_file='annotations/val.json',
        data_prefix=dict(img='val/'),
        test_mode=True,
        pipeline=test_pipeline,
        backend_args=backend_args))
# The other sites (OSBS, SOAP): tools/test.py CONFIG CKPT --cfg-options
# test_dataloader.dataset.ann_file=annotations/test.json
# test_dataloader.dataset.data_prefix.img=test/ test_evaluator.ann_file=...
# (see docs/real_images.md for the exact command).
test_dataloader = val_dataloader
# COCO mAP (IoU 0.5:0.95) and AP50. (AP at IoU 0.4, which tree-crown work
# also reports, needs an ndarray of thresholds that a config cannot hold:
# mmdet passes the list on to pycocotools, whose summary then fails.)
val_evaluator = dict(type='CocoMetric',
                     ann_file=data_root + 'annotations/val.json',
                     metric='bbox', backend_args=backend_args)
test_evaluator = val_evaluator

max_epochs = 24
train_cfg = dict(
    type='EpochBasedTrainLoop', max_epochs=max_epochs, val_interval=max_epochs)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=0.002, weight_decay=0.05),
    clip_grad=dict(max_norm=10, norm_type=2))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=50),
    dict(type='CosineAnnealingLR', eta_min=0.00002, begin=0, end=max_epochs,
         by_epoch=True, convert_to_iter_based=True)
]
default_hooks = dict(
    logger=dict(type='LoggerHook', interval=10),
    checkpoint=dict(type='AtomicCheckpointHook', interval=max_epochs,
                    max_keep_ckpts=1))
env_cfg = dict(dist_cfg=dict(backend='gloo'))
randomness = dict(seed=0, deterministic=False)
auto_scale_lr = dict(enable=False, base_batch_size=8)
