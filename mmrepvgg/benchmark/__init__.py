"""Speed benchmark of RepVGG backbones and detectors (docs/benchmark.md)."""
from .run import build_forms  # noqa: F401
