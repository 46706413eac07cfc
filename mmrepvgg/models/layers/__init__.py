from .qarepvgg_block import QARepVGGBlock  # noqa: F401
from .repvgg_block import RepVGGBlock  # noqa: F401
