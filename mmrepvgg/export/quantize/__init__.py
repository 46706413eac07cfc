"""Post-training static INT8 quantization of exported RepVGG graphs:
calibration inputs, onnxruntime's and NNCF's quantizers, INT8 vs FP32
analysis, and the config + checkpoint workflow. Nothing here imports mmdet
at module level."""
from .analysis import (compare_sessions, detection_agreement,  # noqa: F401
                       format_layer_table, layer_errors, sqnr_db)
from .calibration import (QuantizeError, image_feeds,  # noqa: F401
                          pick_indices)
from .static import (QUANT_METADATA_KEY, boundary_tensors,  # noqa: F401
                     export_module, optimized_op_types, quantizable_nodes,
                     quantize_onnx)
from .workflow import (BACKENDS, DEFAULT_CALIB_IMAGES,  # noqa: F401
                       DEFAULT_MIN_SQNR, DEFAULT_VERIFY_IMAGES,
                       quantize_checkpoint)
