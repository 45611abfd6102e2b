"""Every lossy step of an export, and its quality gate (``quality_gates``): CoreML compression with
coremltools.optimize (``coreml_config``, ``coreml_optimize``, ``mixed_bit``, ``coreml_component``) and ONNX weight
quantization (``onnx_weights`` in PyTorch, ``onnx_quantize`` storing the grid in the .onnx files)."""
