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

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# Thresholds of the medical presets below: "auto" (chosen from the norm distribution, the choice and
# its reason recorded) until someone has measured their register norms on real weights.  Their
# detection layers follow the seed model they were trained like (DINOv2 ViT-L: detect at the second
# last layer, keep the first 5/6 of the blocks, top 50 of 24 x 4096 neurons; CLIP ViT-B/16: detect
# at the last layer, keep the first half, top 20 of 12 x 3072).

# BiomedCLIP (Zhang et al. 2023): a CLIP ViT-B/16 trained on PubMed figures.  open_clip's hub model;
# the image tower (timm trunk + linear projection) is built from its open_clip_config.json, as
# published and copied here, so image features need no download of it and no `transformers`.
BIOMEDCLIP = {
    "model_name": "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224",
    "pretrained": "",
    "open_clip_config": {
        "model_cfg": {
            "embed_dim": 512,
            "vision_cfg": {"timm_model_name": "vit_base_patch16_224", "timm_model_pretrained": False,
                           "timm_pool": "", "timm_proj": "linear", "image_size": 224},
            "text_cfg": {"hf_model_name": "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract",
                         "hf_tokenizer_name": "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract",
                         "hf_proj_type": "mlp", "hf_pooler_type": "cls_last_hidden_state_pooler",
                         "context_length": 256},
        },
        "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]},
    },
    "device": "auto",
    "detect_outliers_layer": -1,       # CLIP-trained ViT-B/16 (12 blocks): CLIP's choices
    "register_norm_threshold": "auto",
    "highest_layer": 5,
    "top_k": 20,
    **COMMON_DEFAULTS,
}

# RAD-DINO (Perez-Garcia et al. 2024): DINOv2 ViT-B/14 continued on chest X-rays.  Run at its native
# 518 px (37x37 patches, no position-embedding resampling) with its processor's resize and crop and
# its grey-level mean and std.  The hub's model.safetensors (Hugging Face Dinov2Model layout) and
# backbone_compatible.safetensors (DINOv2 repository layout) both load.
RAD_DINO = {
    "model_name": "vit_base_patch14_dinov2",
    "pretrained": "hf-hub:microsoft/rad-dino",
    "model_args": {"img_size": 518},
    "preprocess": {"resize": 518, "crop": 518, "interpolation": "bicubic",
                   "mean": (0.5307, 0.5307, 0.5307), "std": (0.2583, 0.2583, 0.2583)},
    "weights_file": "model.safetensors",
    "device": "auto",
    "detect_outliers_layer": -2,       # DINOv2-trained ViT-B (12 blocks): DINOv2's choices,
    "register_norm_threshold": "auto",
    "highest_layer": 9,                # the first 5/6 of the blocks (0..9)
    "top_k": 20,                       # as many neurons as CLIP ViT-B/16 has (12 x 3072): CLIP's 20
    **COMMON_DEFAULTS,
}

# UNI (Chen et al. 2024): ViT-L/16 trained with DINOv2 on 100k pathology slides.  Gated: accept its
# license at https://huggingface.co/MahmoodLab/uni.  The model card's transform (resize 224, ImageNet
# statistics), centre-cropped so that every image has the same 14x14 grid.
UNI = {
    "model_name": "vit_large_patch16_224",
    "pretrained": "hf-hub:MahmoodLab/uni",
    "model_args": {"img_size": 224, "patch_size": 16, "init_values": 1e-5, "dynamic_img_size": True},
    "preprocess": {"resize": 224, "crop": 224, "interpolation": "bilinear", "mean": IMAGENET_MEAN, "std": IMAGENET_STD},
    "weights_file": "pytorch_model.bin",
    "gated": True,
    "device": "auto",
    "detect_outliers_layer": -2,       # DINOv2-trained ViT-L (24 blocks): DINOv2 ViT-L/14's choices
    "register_norm_threshold": "auto",
    "highest_layer": 19,
    "top_k": 50,
    **COMMON_DEFAULTS,
}

# Virchow2 (Zimmermann et al. 2024): ViT-H/14 with a SwiGLU MLP (the neurons are the 3416 gated units
# fed to fc2) and 4 trained registers, trained with DINOv2 on 3.1M pathology slides.  Gated: accept
# its license at https://huggingface.co/paige-ai/Virchow2.  Published without pooling (its forward
# returns every token): the tool pools the final-norm CLS token.
VIRCHOW2 = {
    "model_name": "vit_huge_patch14_224",
    "pretrained": "hf-hub:paige-ai/Virchow2",
    "model_args": {"img_size": 224, "init_values": 1e-5, "mlp_ratio": 5.3375, "reg_tokens": 4,
                   "mlp_layer": "SwiGLUPacked", "act_layer": "silu", "global_pool": "", "dynamic_img_size": True},
    "preprocess": {"resize": 224, "crop": 224, "interpolation": "bicubic", "mean": IMAGENET_MEAN, "std": IMAGENET_STD},
    "weights_file": "pytorch_model.bin",
    "gated": True,
    "device": "auto",
    "detect_outliers_layer": -2,       # DINOv2-trained (32 blocks): DINOv2's choices,
    "register_norm_threshold": "auto",
    "highest_layer": 26,               # the first 5/6 of the blocks (0..26)
    "top_k": 50,                       # 32 x 3416 neurons, about DINOv2 ViT-L's 24 x 4096: its 50
    **COMMON_DEFAULTS,
    # The model card's embedding: the CLS token concatenated with the mean of the patch tokens (the
    # trained registers left out), 2560-d.
    "feature": "cls+patch_mean",
}

# --model NAME -> (the family that builds it, its config dict); families are code (common/models/),
# presets are data.  Any other timm or open_clip ViT: --model timm:<name> or open_clip:<arch>:<tag>.
PRESETS = {
    "clip": ("clip", CLIP),
    "dinov2": ("dinov2", DINOV2),
    "dinov3": ("dinov3", DINOV3),
    "biomedclip": ("clip", BIOMEDCLIP),
    "rad-dino": ("timm", RAD_DINO),
    "uni": ("timm", UNI),
    "virchow2": ("timm", VIRCHOW2),
}
MODEL_CONFIGS = {name: config for name, (_, config) in PRESETS.items()}

# Run settings shared by every dataset (command-line flags override them).
RUN_DEFAULTS = {
    "seed": 0,
    "batch_size": 32,
    "num_workers": "auto",        # image decoding threads; auto = the host's cores (cores - 1 on CUDA)
    "precision": "auto",          # auto (bf16 autocast on CUDA, fp32 elsewhere) | fp32 | bf16
    "extra_modes": (),            # opt-in experiments besides no-ttr and ttr, e.g. ("no-ttr-removed", "ttr-mean")
    "controls": False,            # --controls: every control that applies to the model (docs/intervention.md)
    "random_draws": 10,           # ttr-random: draws of random neurons, layer-matched to the selected ones
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
    "bootstrap_resamples": 1000,  # paired bootstrap of the test set (intervals; docs/statistics.md)
    "permutations": 2000,         # paired permutation test of the metrics other than top-1 (p >= 1/2001)
    "probe_refits": 20,           # probe procedure rerun on bootstrap resamples of the training set (0: off)
    "primary_metric": "auto",     # the metric the answer is about; auto = PRIMARY_METRIC of the dataset
    "figure_images": 4,           # test images drawn in the norm and attention maps
    "analysis_images": 128,       # test images used for outliers.csv and the layer curves
}

# The metric each dataset's answer (the verdict of summary.md) is about; the others are reported as
# secondary.  "manifest" is a dataset given by --manifest.  --set primary_metric=... overrides it
# for one run (any metric the dataset reports, e.g. f1_macro; qwk needs APTOS grades).
PRIMARY_METRIC = {
    "pacemaker": "top1",
    "orthonet": "top1",
    "aptos": "qwk",
    "manifest": "top1",
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
