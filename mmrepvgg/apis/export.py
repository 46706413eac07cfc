"""Moved to :mod:`mmrepvgg.export.onnx_export` (kept importable for code
that still imports it from here; import from the new place)."""
from mmrepvgg.export.onnx_export import (DEFAULT_OPSET, ExportError,  # noqa
                                         TensorForward, export_onnx,
                                         export_to)
