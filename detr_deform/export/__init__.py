"""Exporting a model to other runtimes (ONNX)."""
