from .repvgg import ARCH_SETTINGS, RepVGG  # noqa: F401
