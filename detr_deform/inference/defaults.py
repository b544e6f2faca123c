"""Defaults shared by the Detector and tools/infer.py, in a module without torch (the tool's
--help shows them before anything heavy is imported)."""

DEFAULT_BATCH_SIZE = 8  # images per forward pass, for the Detector and tools/infer.py alike
