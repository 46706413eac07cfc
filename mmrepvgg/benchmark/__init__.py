"""Speed benchmark of RepVGG backbones and detectors (behind
``tools/analysis_tools/benchmark.py`` and the demo's summary): options
(:mod:`.options`), the forms of a backbone and one run (:mod:`.run`), its
report (:mod:`.report`) and whole-detector forms (:mod:`.detector`), all
timed by :mod:`mmrepvgg.utils.timing`.
"""
from .run import build_forms  # noqa: F401
