from .repvgg_fpn import RepVGGFPN  # noqa: F401
