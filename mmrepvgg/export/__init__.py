"""What leaves PyTorch: ONNX export, in-graph post-processing, runtimes,
evaluation and INT8 quantization, one module per concern; imported on use
(``import mmrepvgg`` does not need onnx)."""
