"""``backend::onnx``: chunks as .onnx graphs with external weights, run by onnxruntime (or OpenVINO) at check time.

- ``prepare``: int8 / int4 weight quantization in PyTorch, gated (export/compression/onnx_weights.py)
- ``writer``: the registered chunk writer; ``convert``: torch.onnx (dynamo) → an .onnx file; ``files``: the on-disk
  layout; ``optimized``: onnxruntime's optimized graph written beside each chunk. The chunks are checked by running
  them (export/check_component.py): onnxruntime runs everywhere.
"""

from pocketsd.export.backends.base import BACKENDS, Backend
from pocketsd.export.backends.onnx.prepare import prepare
from pocketsd.export.backends.onnx.writer import OnnxChunkWriter

BACKENDS.register("onnx")(Backend("onnx", prepare, OnnxChunkWriter))
