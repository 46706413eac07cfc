"""What leaves PyTorch: ONNX export, in-graph post-processing, runtimes,
evaluation of exported files and INT8 quantization, one module per concern
(``docs/architecture.md``). Modules are imported on use: ``import mmrepvgg``
does not need onnx.
"""
