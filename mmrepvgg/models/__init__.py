from .backbones import ARCH_SETTINGS, RepVGG
from .layers import RepVGGBlock, SELayer
from .necks import RepVGGFPN

__all__ = ['ARCH_SETTINGS', 'RepVGG', 'RepVGGBlock', 'RepVGGFPN', 'SELayer']
