"""mmrepvgg: RepVGG blocks and backbones for mmdet, with exact deploy fusion.

``import mmrepvgg`` registers ``RepVGGBlock`` (and the ``RepVGG`` backbone)
into mmdet's ``MODELS`` registry.
"""
from .deploy import (count_reparam_blocks, register_safe_globals,
                     safe_loading, switch_to_deploy)
from .engine import SwitchToDeployHook
from .models import (ARCH_SETTINGS, QARepVGGBlock, RepVGG, RepVGGBlock,
                     RepVGGFPN)
from .version import __version__

# Nothing is allowlisted for torch.load at import (see README, safe
# checkpoint loading): load_checkpoint and `with safe_loading():` scope it.

__all__ = [
    '__version__', 'ARCH_SETTINGS', 'QARepVGGBlock', 'RepVGG', 'RepVGGBlock',
    'RepVGGFPN', 'SwitchToDeployHook', 'switch_to_deploy',
    'count_reparam_blocks', 'register_safe_globals', 'safe_loading'
]
