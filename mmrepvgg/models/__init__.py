from .backbones import ARCH_SETTINGS, RepVGG
from .layers import (QARepVGGBlock, RepBlockBase, RepVGGBlock, SELayer,
                     is_reparam_block)
from .necks import RepVGGFPN

__all__ = ['ARCH_SETTINGS', 'QARepVGGBlock', 'RepBlockBase', 'RepVGG',
           'RepVGGBlock', 'RepVGGFPN', 'SELayer', 'is_reparam_block']
