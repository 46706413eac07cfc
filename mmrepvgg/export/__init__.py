"""What leaves PyTorch: ONNX export of deploy-form models, the in-graph
post-processing of single-stage detectors, onnxruntime inference and dataset
evaluation of exported files, INT8 quantization.

One module per concern:

- :mod:`.loading`: the deploy-form model of a config + checkpoint;
- :mod:`.postprocess`: mmdet's dense-head post-processing as traceable
  tensor code (decoding, score threshold, top-k, class-aware NMS);
- :mod:`.onnx_export`: graph building, ``torch.onnx.export`` and the export
  workflow behind ``tools/export_onnx.py``;
- :mod:`.runtime`: onnxruntime sessions, runs and interleaved timing;
- :mod:`.verify`: exported graph vs PyTorch (raw tensors by float32 noise,
  detections vs mmdet's ``predict``);
- :mod:`.evaluate`: an exported file in mmdet's test loop
  (``tools/test.py CONFIG MODEL.onnx``);
- :mod:`.quantize`: INT8 quantization.

Modules are imported on use: ``import mmrepvgg`` does not need onnx.
"""
