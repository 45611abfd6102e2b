"""``backend::coreml``: chunks as ML programs (.mlpackage) for Apple devices.

- ``prepare``: compression with coremltools.optimize (palettes, linear int8, mixed-bit) or fp16 weights, gated
  (export/compression/coreml_component.py)
- ``writer``: the registered chunk writer; ``convert``: torch.export → coremltools.convert → an .mlpackage;
  ``check``: the package's spec against the plan (structure, everywhere); ``palettes``: palettized weights stored.
  Predictions run on macOS only (export/check_component.py says why elsewhere).
"""

from pocketsd.export.backends.base import BACKENDS, Backend
from pocketsd.export.backends.coreml.prepare import prepare
from pocketsd.export.backends.coreml.writer import CoreMLChunkWriter

BACKENDS.register("coreml")(Backend("coreml", prepare, CoreMLChunkWriter))
