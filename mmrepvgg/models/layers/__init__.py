from .qarepvgg_block import QARepVGGBlock
from .repvgg_block import RepBlockBase, RepVGGBlock, is_reparam_block
from .se_layer import SELayer

__all__ = ['QARepVGGBlock', 'RepBlockBase', 'RepVGGBlock', 'SELayer',
           'is_reparam_block']
