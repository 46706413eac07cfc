"""apis.runner: what tools/train.py and tools/test.py share."""


def test_train_uses_atomic_hook_for_plain_checkpoint_hooks():
    from mmengine.config import Config

    from mmrepvgg.apis.runner import use_atomic_checkpoints
    cfg = Config(dict(
        default_hooks=dict(checkpoint=dict(type='CheckpointHook',
                                           interval=2)),
        custom_hooks=[dict(type='CheckpointHook', by_epoch=False),
                      dict(type='EMAHook')]))
    assert use_atomic_checkpoints(cfg) == 2
    assert cfg.default_hooks.checkpoint.type == 'AtomicCheckpointHook'
    assert cfg.default_hooks.checkpoint.interval == 2
    assert [h['type'] for h in cfg.custom_hooks] == [
        'AtomicCheckpointHook', 'EMAHook']
