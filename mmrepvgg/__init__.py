"""mmrepvgg: RepVGG blocks and backbones for mmdet, with exact deploy fusion.

``import mmrepvgg`` registers the modules and hooks and loads no checkpoint
code: ``safe_loading`` and ``register_safe_globals`` resolve on first use.
"""
from .deploy import count_reparam_blocks, switch_to_deploy
from .engine import SwitchToDeployHook
from .models import (ARCH_SETTINGS, QARepVGGBlock, RepVGG, RepVGGBlock,
                     RepVGGFPN)
from .version import __version__


def __getattr__(name: str):
    if name in ('register_safe_globals', 'safe_loading'):
        from .deploy import checkpoint
        return getattr(checkpoint, name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


__all__ = [
    '__version__', 'ARCH_SETTINGS', 'QARepVGGBlock', 'RepVGG', 'RepVGGBlock',
    'RepVGGFPN', 'SwitchToDeployHook', 'switch_to_deploy',
    'count_reparam_blocks', 'register_safe_globals', 'safe_loading'
]
