"""Model config dicts and run defaults.

Plain Python on purpose: edit a value here, or override it for one run with
``--set KEY=VALUE`` (an unknown key is an error that lists the valid ones).

The CLIP and DINOv2 dicts keep the seed's keys and values.  (The reference repository's own
yaml files use ``top_k`` 10 for CLIP and ``highest_layer`` 17 for DINOv2; we keep the seed's.)
"""

# Keys every model config accepts, with their defaults (docs/configuration.md).
COMMON_DEFAULTS = {
    "num_registers": 1,           # test-time register tokens appended in ttr mode (R >= 1)
    "scale": 1.0,                 # register positions get scale * signed max
    "normal_values": "zero",      # zero | mean | only_outliers | same  (what patch positions get, docs/intervention.md)
    "feature": "cls",             # cls | patch_mean | cls+patch_mean
    "intervention_max": "layer",  # layer: one signed max per (image, layer) (docs/intervention.md) | neuron: one per neuron
}

CLIP = {
    "model_name": "ViT-B-16",
    "pretrained": "laion2b_s34b_b88k",
    "device": "auto",             # "auto" = cuda, then mps, then cpu; an unavailable explicit device is an error
    "highest_layer": 5,
    "detect_outliers_layer": -1,
    "register_norm_threshold": 30,
    "top_k": 20,
    # The checkpoint was trained with GELU (open_clip's default for this tag).  The course project
    # and the reference repository *ask* for QuickGELU, but their factory passes the flag on only
    # for "openai" weights: for laion2b_s34b_b88k they ran GELU, as we do, and their threshold 30
    # was found with GELU.  True forces QuickGELU: an experiment, not the reference's setting.
    "force_quick_gelu": False,
    **COMMON_DEFAULTS,
}

DINOV2 = {
    "backbone_size": "vitl14",    # vits14 | vitb14 | vitl14 | vitg14, and *_reg (trained registers)
    "device": "auto",
    "detect_outliers_layer": -2,
    "register_norm_threshold": 150,
    "highest_layer": 19,
    "top_k": 50,
    **COMMON_DEFAULTS,
}

# DINOv3 (timm's Eva with RoPE and 4 trained registers).  Nobody has measured its register norms on
# medical images yet: the threshold is chosen from the norm distribution ("auto") until someone does.
# highest_layer 19 mirrors DINOv2 ViT-L (same depth, 24 blocks); lower it for vits16/vitb16 (12 blocks).
DINOV3 = {
    "backbone_size": "vitl16",    # vits16 | vitb16 | vitl16
    "device": "auto",
    "detect_outliers_layer": -2,
    "register_norm_threshold": "auto",
    "highest_layer": 19,
    "top_k": 50,
    **COMMON_DEFAULTS,
}

MODEL_CONFIGS = {"clip": CLIP, "dinov2": DINOV2, "dinov3": DINOV3}

# Run settings shared by every dataset (command-line flags override them).
RUN_DEFAULTS = {
    "seed": 0,
    "batch_size": 32,
    "num_workers": "auto",        # image decoding threads; auto = the host's cores (cores - 1 on CUDA)
    "precision": "auto",          # auto (bf16 autocast on CUDA, fp32 elsewhere) | fp32 | bf16
    "extra_modes": (),            # opt-in experiments besides no-ttr and ttr, e.g. ("no-ttr-removed",)
    "zero_shot": False,           # CLIP only: also score class-name prompts, no-ttr vs ttr (see ZERO_SHOT)
    "detect_images": 100,         # seeded random sample of training images used for detection
    "val_fraction": 0.15,
    "test_fraction": 0.15,
    "probe_seeds": (0, 1, 2),
    "probe_lr_grid": (1e-3, 3e-3, 1e-2),
    "probe_weight_decay_grid": (1e-4, 1e-2),
    "probe_max_epochs": 200,
    "probe_patience": 15,
    "probe_min_delta": 1e-4,      # a val-loss improvement must exceed this fraction of the best to count
    "probe_class_weights": False,
    "bootstrap_resamples": 1000,
    "figure_images": 4,           # test images drawn in the norm and attention maps
    "analysis_images": 128,       # test images used for outliers.csv and the layer curves
}

# CLIP zero-shot (--zero_shot): each class is scored by the mean text embedding of its prompts,
# ``template.format(name)`` for every template, with ``name`` from ``class_names`` (else the class
# name with "_" and " - " turned into spaces; Pacemaker manufacturer codes spelled out).  Edit freely:
# the prompts used are recorded in the run's zero_shot_prompts.json.
ZERO_SHOT = {
    "pacemaker": {
        "templates": ("a chest X-ray showing a {} pacemaker.", "a chest radiograph of a patient with a {} device.",
                      "an X-ray of a {} cardiac implantable electronic device."),
        "manufacturers": {"MDT": "Medtronic", "STJ": "St. Jude Medical", "BOS": "Boston Scientific",
                          "BIO": "Biotronik", "SOR": "Sorin"},
        "class_names": {},
    },
    "orthonet": {
        "templates": ("an X-ray of a {} implant.", "a radiograph showing a {} joint replacement.",
                      "an orthopaedic X-ray of a {} prosthesis."),
        "manufacturers": {},
        "class_names": {
            "Hip_DepuySynthes_Corail_Collar": "DePuy Synthes Corail collared hip",
            "Hip_DepuySynthes_Corail_NilCol": "DePuy Synthes Corail collarless hip",
            "Hip_JRIOrtho_FurlongEvolution_Collar": "JRI Furlong Evolution collared hip",
            "Hip_JRIOrtho_FurlongEvolution_NilCol": "JRI Furlong Evolution collarless hip",
            "Hip_SmithAndNephew_Anthology": "Smith and Nephew Anthology hip",
            "Hip_SmithAndNephew_Polarstem_NilCol": "Smith and Nephew Polarstem collarless hip",
            "Hip_Stryker_AccoladeII": "Stryker Accolade II hip",
            "Hip_Stryker_Exeter": "Stryker Exeter hip",
            "Knee_Depuy_Synthes_Sigma": "DePuy Synthes Sigma knee",
            "Knee_SmithAndNephew_GenesisII": "Smith and Nephew Genesis II knee",
            "Knee_SmithAndNephew_Legion": "Smith and Nephew Legion knee",
            "Knee_ZimmerBiomet_Oxford": "Zimmer Biomet Oxford knee",
        },
    },
    "aptos": {
        "templates": ("a retinal fundus photograph with {}.", "a fundus image showing {}.",
                      "an eye fundus photo graded as {}."),
        "manufacturers": {},
        "class_names": {"0 - No DR": "no diabetic retinopathy", "1 - Mild": "mild diabetic retinopathy",
                        "2 - Moderate": "moderate diabetic retinopathy",
                        "3 - Severe": "severe diabetic retinopathy",
                        "4 - Proliferative DR": "proliferative diabetic retinopathy"},
    },
}
