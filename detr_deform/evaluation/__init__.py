"""COCO evaluation (pycocotools or faster-coco-eval) and the F1-maximising score threshold."""
