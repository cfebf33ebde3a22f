"""The zoo's model names and ImageNet weights, torch-free, for config validation (tests keep them equal to
models.zoo's table)."""

MODEL_NAMES = ("resnet18", "resnet50", "efficientnet_b0", "swin_t", "swin_s", "vit_b_16",
               "medical_cnn", "xception_medical")

# torchvision weights each model starts from with pretrained: true (IMAGENET1K_V1 everywhere: the weights
# torchvision's `pretrained=True` gave, so results compare); xception_medical's come from timm.
IMAGENET_WEIGHTS = {
    "resnet18": "ResNet18_Weights.IMAGENET1K_V1",
    "resnet50": "ResNet50_Weights.IMAGENET1K_V1",
    "efficientnet_b0": "EfficientNet_B0_Weights.IMAGENET1K_V1",
    "swin_t": "Swin_T_Weights.IMAGENET1K_V1",
    "swin_s": "Swin_S_Weights.IMAGENET1K_V1",
    "vit_b_16": "ViT_B_16_Weights.IMAGENET1K_V1",
    "medical_cnn": "EfficientNet_B0_Weights.IMAGENET1K_V1",
    "xception_medical": None,
}
