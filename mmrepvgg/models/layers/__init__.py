from .repvgg_block import RepVGGBlock
from .se_layer import SELayer

__all__ = ['RepVGGBlock', 'SELayer']
