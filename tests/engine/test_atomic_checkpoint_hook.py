"""engine.hooks.AtomicCheckpointHook: found by its name in every scope (the
kill-while-saving tests run tools/train.py: tests/tools)."""


def test_atomic_hook_is_registered_for_any_scope():
    import mmrepvgg  # noqa: F401
    from mmdet.registry import HOOKS as MMDET_HOOKS
    from mmengine.registry import HOOKS

    from mmrepvgg.engine import AtomicCheckpointHook
    assert HOOKS.get('AtomicCheckpointHook') is AtomicCheckpointHook
    assert MMDET_HOOKS.get('AtomicCheckpointHook') is AtomicCheckpointHook
