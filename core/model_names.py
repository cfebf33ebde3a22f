"""The zoo's model names, torch-free, for config validation (tests keep it equal to models.zoo's table)."""

MODEL_NAMES = ("resnet18", "resnet50", "efficientnet_b0", "swin_t", "swin_s", "vit_b_16",
               "medical_cnn", "xception_medical")
