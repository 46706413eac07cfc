from .repvgg_fpn import RepVGGFPN

__all__ = ['RepVGGFPN']
