"""Whole models and checkpoint files. The checkpoint names resolve on first
use (PEP 562): building or switching a model never loads the unpickler."""
from mmrepvgg.models.layers.fusion import (  # noqa: F401
    fuse_conv_norm, fuse_identity_norm, identity_kernel, is_fusable_norm,
    norm_scale_shift, pad_kernel_to)
from .config import make_deploy_config  # noqa: F401
from .switch import count_reparam_blocks, switch_to_deploy  # noqa: F401


def __getattr__(name: str):
    if name in ('CheckpointError', 'atomic_write', 'load_checkpoint',
                'register_safe_globals', 'safe_loading', 'save_checkpoint'):
        from . import checkpoint
        return getattr(checkpoint, name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
