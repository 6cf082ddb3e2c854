"""Benchmarks of edgeagent against onnxruntime in-process (``python -m benchmarks.run``)."""
