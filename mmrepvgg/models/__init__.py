from .backbones import ARCH_SETTINGS, RepVGG  # noqa: F401
from .layers import QARepVGGBlock, RepVGGBlock  # noqa: F401
from .necks import RepVGGFPN  # noqa: F401
