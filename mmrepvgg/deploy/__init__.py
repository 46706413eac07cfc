"""Model-level switch, config rewrite, verification and checkpoint I/O.

The fusion maths lives with the blocks (:mod:`mmrepvgg.models.layers.fusion`)
and is re-exported here. The checkpoint names are imported on first use
(PEP 562), so that building or switching a model never loads the unpickler.
"""
from mmrepvgg.models.layers.fusion import (fuse_conv_norm, fuse_identity_norm,
                                           identity_kernel, is_fusable_norm,
                                           norm_scale_shift, pad_kernel_to)
from .config import make_deploy_config, set_deploy
from .switch import count_reparam_blocks, switch_to_deploy

#: Names of :mod:`mmrepvgg.deploy.checkpoint`, resolved by ``__getattr__``.
_CHECKPOINT_NAMES = ('CheckpointError', 'atomic_write', 'load_checkpoint',
                     'register_safe_globals', 'safe_loading',
                     'save_checkpoint')


def __getattr__(name: str):
    if name in _CHECKPOINT_NAMES:
        from . import checkpoint
        return getattr(checkpoint, name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


__all__ = [
    *_CHECKPOINT_NAMES, 'fuse_conv_norm', 'fuse_identity_norm',
    'identity_kernel', 'is_fusable_norm', 'norm_scale_shift', 'pad_kernel_to',
    'count_reparam_blocks', 'switch_to_deploy', 'make_deploy_config',
    'set_deploy'
]
