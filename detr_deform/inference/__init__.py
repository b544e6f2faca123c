"""High-level inference: the Detector (any image kind, batches grouped by size), inputs,
videos, and where the deformable attention sampled."""
