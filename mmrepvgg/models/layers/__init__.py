from .qarepvgg_block import QARepVGGBlock
from .repvgg_block import RepBlockBase, RepVGGBlock
from .se_layer import SELayer

__all__ = ['QARepVGGBlock', 'RepBlockBase', 'RepVGGBlock', 'SELayer']
