"""Post-training static INT8 quantization of exported RepVGG graphs, one
module per concern:

- :mod:`.calibration`: real images of a config's split as graph inputs;
- :mod:`.static`: onnxruntime's static quantization of the conv region;
- :mod:`.nncf_ptq`: the same region quantized by NNCF, optionally with
  accuracy control by the detector's mAP;
- :mod:`.analysis`: INT8 vs FP32 per output, per detection, per layer;
- :mod:`.workflow`: config + checkpoint -> verified INT8 file
  (``tools/deployment/quantize.py``).

Nothing here imports mmdet at module level: the functions that read a
config's dataset (:func:`.calibration.preprocessed_images`) import it when
called.
"""
from .analysis import (DET_BOX_TOL_REL, DET_SCORE_TOL, ErrorStats,
                       compare_sessions, dequantized_name,
                       detection_agreement, format_layer_table, layer_errors,
                       layer_name, sqnr_db)
from .calibration import (QuantizeError, build_preprocessor, build_split,
                          pick_indices, preprocessed_images,
                          split_dataset_cfg)
from .static import (CALIBRATION_METHODS, QUANT_FORMATS, QUANT_METADATA_KEY,
                     QUANT_TYPES, QuantConfig, boundary_tensors,
                     export_module, optimized_op_types, quantizable_nodes,
                     quantize_onnx)
from .workflow import (BACKENDS, DEFAULT_CALIB_IMAGES, DEFAULT_MIN_SQNR,
                       DEFAULT_VERIFY_IMAGES, quantize_checkpoint)

__all__ = [
    'BACKENDS', 'CALIBRATION_METHODS', 'DEFAULT_CALIB_IMAGES',
    'DEFAULT_MIN_SQNR',
    'DEFAULT_VERIFY_IMAGES', 'DET_BOX_TOL_REL', 'DET_SCORE_TOL',
    'ErrorStats', 'QUANT_FORMATS', 'QUANT_METADATA_KEY', 'QUANT_TYPES',
    'QuantConfig', 'QuantizeError', 'boundary_tensors', 'build_preprocessor',
    'build_split', 'compare_sessions', 'dequantized_name',
    'detection_agreement', 'export_module', 'format_layer_table',
    'layer_errors', 'layer_name', 'optimized_op_types', 'pick_indices',
    'preprocessed_images', 'quantizable_nodes', 'quantize_checkpoint',
    'quantize_onnx', 'split_dataset_cfg', 'sqnr_db'
]
