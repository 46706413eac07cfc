"""What leaves PyTorch: ONNX export of deploy-form models, the in-graph
post-processing of single-stage detectors, onnxruntime inference and dataset
evaluation of exported files, INT8 quantization.

One module per concern:

- :mod:`.loading`: the deploy-form model of a config + checkpoint;
- :mod:`.postprocess`: mmdet's dense-head post-processing as traceable
  tensor code (decoding, score threshold, top-k, class-aware NMS) and the
  settings an end-to-end graph records;
- :mod:`.graph`: the traced function and ``torch.onnx.export``;
- :mod:`.onnx_export`: the export workflow behind
  ``tools/deployment/export_onnx.py`` (check, build, verify, write, time);
- :mod:`.runtime`: onnxruntime sessions and runs;
- :mod:`.verify`: exported graph vs PyTorch (raw tensors by float32 noise,
  detections vs mmdet's ``predict``);
- :mod:`.evaluate`: an exported file in mmdet's test loop
  (``tools/test.py CONFIG MODEL.onnx``);
- :mod:`.quantize`: INT8 quantization (calibration, quantization, analysis,
  workflow).

Modules are imported on use: ``import mmrepvgg`` does not need onnx.
"""
