# Multi-GPU variant: SyncBN in the backbone (statistics synchronised across
# processes), 8 GPUs x 2 images. Launch with
#   bash tools/dist_train.sh configs/repvgg/retinanet_repvgg-a0_fpn_syncbn-8xb2-1x_coco.py 8
_base_ = './retinanet_repvgg-a0_fpn_1x_coco.py'

model = dict(
    backbone=dict(
        norm_cfg=dict(type='SyncBN', requires_grad=True), norm_eval=False))
train_dataloader = dict(batch_size=2, num_workers=2)
auto_scale_lr = dict(enable=False, base_batch_size=16)
