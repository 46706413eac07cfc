"""Post-training static INT8 quantization of exported RepVGG graphs:
calibration inputs, onnxruntime's and NNCF's quantizers, INT8 vs FP32
analysis, and the config + checkpoint workflow. Nothing here imports mmdet
at module level."""
from .analysis import (compare_sessions, detection_agreement,
                       format_layer_table, layer_errors, sqnr_db)
from .calibration import QuantizeError, pick_indices, preprocessed_images
from .static import (QUANT_METADATA_KEY, QuantConfig, boundary_tensors,
                     export_module, optimized_op_types, quantizable_nodes,
                     quantize_onnx)
from .workflow import (BACKENDS, DEFAULT_CALIB_IMAGES, DEFAULT_MIN_SQNR,
                       DEFAULT_VERIFY_IMAGES, quantize_checkpoint)

__all__ = [
    'BACKENDS', 'DEFAULT_CALIB_IMAGES', 'DEFAULT_MIN_SQNR',
    'DEFAULT_VERIFY_IMAGES', 'QUANT_METADATA_KEY', 'QuantConfig',
    'QuantizeError', 'boundary_tensors', 'compare_sessions',
    'detection_agreement', 'export_module', 'format_layer_table',
    'layer_errors', 'optimized_op_types', 'pick_indices',
    'preprocessed_images', 'quantizable_nodes', 'quantize_checkpoint',
    'quantize_onnx', 'sqnr_db'
]
