"""The official COCO recipe's image sizes: the one place these numbers are written (DataConfig,
the transforms, the Detector and the Hugging Face image processor use them). No torch here:
the configuration schema, and so every tool's --help, reads them."""

OFFICIAL_TRAIN_SCALES = tuple(range(480, 801, 32))  # shorter side in training (random choice)
OFFICIAL_VAL_SIZE = 800       # shorter side in validation
OFFICIAL_MAX_SIZE = 1333      # longer-side limit
OFFICIAL_CROP_RESIZE_SIZES = (400, 500, 600)
OFFICIAL_CROP_MIN, OFFICIAL_CROP_MAX = 384, 600
