"""Re-parameterization maths, model-level switch and checkpoint I/O.

Nothing in this sub-package imports mmdet.
"""
from .checkpoint import (CheckpointError, atomic_write, load_checkpoint,
                         register_safe_globals, safe_loading,
                         save_checkpoint)
from .config import make_deploy_config, set_deploy
from .fusion import (fuse_conv_norm, fuse_identity_norm, identity_kernel,
                     is_fusable_norm, norm_scale_shift, pad_kernel_to)
from .switch import count_reparam_blocks, switch_to_deploy

__all__ = [
    'CheckpointError', 'atomic_write', 'load_checkpoint',
    'register_safe_globals', 'safe_loading', 'save_checkpoint',
    'fuse_conv_norm', 'fuse_identity_norm', 'identity_kernel',
    'is_fusable_norm', 'norm_scale_shift', 'pad_kernel_to',
    'count_reparam_blocks', 'switch_to_deploy', 'make_deploy_config',
    'set_deploy'
]
