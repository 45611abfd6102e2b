"""The export backends, peers with one shape each (``backend::onnx``, ``backend::coreml``): a folder per backend with
``prepare`` (its lossy step, before capture), ``writer`` (the registered chunk writer) and the modules those call
(``convert``: torch → the backend's file; ``check``: what can be checked of that file). ``exporter.py`` asks
``backend_for(preset.backend)`` and never branches on the name."""
