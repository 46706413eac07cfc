from .backbones import ARCH_SETTINGS, RepVGG
from .layers import QARepVGGBlock, RepBlockBase, RepVGGBlock, SELayer
from .necks import RepVGGFPN

__all__ = ['ARCH_SETTINGS', 'QARepVGGBlock', 'RepBlockBase', 'RepVGG',
           'RepVGGBlock', 'RepVGGFPN', 'SELayer']
