"""Model config dicts and run defaults.

Plain Python on purpose: edit a value here, or override it for one run with
``--set KEY=VALUE`` (an unknown key is an error that lists the valid ones).

The CLIP and DINOv2 dicts keep the seed's keys and values.  (The reference repository's own
yaml files use ``top_k`` 10 for CLIP and ``highest_layer`` 17 for DINOv2; we keep the seed's.)
"""

# Keys every model config accepts, with their defaults (SPEC §2).
COMMON_DEFAULTS = {
    "device": "auto",             # "auto" = cuda, then mps, then cpu; an unavailable explicit device is an error
    "num_registers": 1,           # test-time register tokens appended in ttr mode (R >= 1)
    "scale": 1.0,                 # register positions get scale * signed max
    "normal_values": "zero",      # zero | mean | only_outliers | same  (what patch positions get, SPEC §4)
    "feature": "cls",             # cls | patch_mean | cls+patch_mean
}

CLIP = {
    "model_name": "ViT-B-16",
    "pretrained": "laion2b_s34b_b88k",
    "device": "auto",
    "highest_layer": 5,
    "detect_outliers_layer": -1,
    "register_norm_threshold": 30,
    "top_k": 20,
    # The checkpoint was trained with GELU (open_clip's default for this tag).  True forces
    # QuickGELU, the reference repository's setting (its threshold 30 was tuned that way).
    "force_quick_gelu": False,
    **{k: v for k, v in COMMON_DEFAULTS.items() if k != "device"},
}

DINOV2 = {
    "backbone_size": "vitl14",    # vits14 | vitb14 | vitl14 | vitg14, and *_reg (trained registers)
    "device": "auto",
    "detect_outliers_layer": -2,
    "register_norm_threshold": 150,
    "highest_layer": 19,
    "top_k": 50,
    **{k: v for k, v in COMMON_DEFAULTS.items() if k != "device"},
}

MODEL_CONFIGS = {"clip": CLIP, "dinov2": DINOV2}

# Run settings shared by every dataset (command-line flags override them).
RUN_DEFAULTS = {
    "seed": 0,
    "batch_size": 32,
    "num_workers": 2,
    "detect_images": 100,         # seeded random sample of training images used for detection
    "val_fraction": 0.15,
    "test_fraction": 0.15,
    "probe_seeds": (0, 1, 2),
    "probe_lr_grid": (1e-3, 3e-3, 1e-2),
    "probe_weight_decay_grid": (1e-4, 1e-2),
    "probe_max_epochs": 200,
    "probe_patience": 15,
    "probe_class_weights": False,
    "bootstrap_resamples": 1000,
    "figure_images": 4,           # test images drawn in the norm and attention maps
    "analysis_images": 128,       # test images used for outliers.csv and the layer curves
}
