from .repvgg import ARCH_SETTINGS, RepVGG

__all__ = ['ARCH_SETTINGS', 'RepVGG']
