"""High-level workflows that need mmdet (conversion of whole detectors)."""
from .convert import (ConvertError, collect_outputs, compare_outputs,
                      convert_checkpoint, find_checkpoints, verify_models)

__all__ = ['ConvertError', 'collect_outputs', 'compare_outputs',
           'convert_checkpoint', 'find_checkpoints', 'verify_models']
