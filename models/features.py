"""The features the out-of-distribution score measures, for any model of the zoo, and the model with that score.

Every model of the zoo ends in one nn.Linear (the classifier) applied to a flat feature vector. `split_classifier`
cuts the model there: the body (a copy whose last Linear is an identity) gives the classifier's input, the Linear
turns it into logits, exactly as the whole model does. `FeatureModel` returns (logits, features): the classifier's
input, and before it the spatially averaged output of a middle stage of the network (MIDDLE_LAYERS; taken with
torchvision's feature extraction, one pass). The classifier's input alone misses images whose content is unlike a
brain's but whose pooled last-stage activations look ordinary (on the demo, grey levels sorted into stripes: 6% of
them referred); with a middle stage beside it, every self-check set is referred (docs/ood.md).
`ScoredModel` returns (logits, ood_distance): the Mahalanobis distance of the features to the nearest class mean
under the training split's shared covariance (Lee et al., 2018, who also combine several layers). The class means
and the whitening matrix are buffers of the module, so the distance travels inside the checkpoint's tensors and
the ONNX graph's weights: a runtime needs no extra file and computes it the same way.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

# The checkpoint key of {"centers", "whitening" (tensors), "middle" ([module path, layout], or absent)}
FEATURE_OOD_STATE = "feature_ood_state"
# A middle stage of each model (module path, layout of its output), averaged over space (or tokens).
MIDDLE_LAYERS = {
    "resnet18": ("layer3", "nchw"), "resnet50": ("layer3", "nchw"),
    "efficientnet_b0": ("features.5", "nchw"), "medical_cnn": ("backbone.0.5", "nchw"),
    "xception_medical": ("backbone.block8", "nchw"),
    "swin_t": ("features.5", "nhwc"), "swin_s": ("features.5", "nhwc"),
    "vit_b_16": ("encoder.layers.encoder_layer_6", "tokens"),
}
POOL_DIMS = {"nchw": (2, 3), "nhwc": (1, 2), "tokens": (1,)}


def last_linear(model: nn.Module) -> str:
    """The qualified name of the model's classifier: its last nn.Linear."""
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ValueError(f"{type(model).__name__} has no nn.Linear classifier to take features from")
    return names[-1]


def split_classifier(model: nn.Module) -> tuple[nn.Module, nn.Linear]:
    """(body, classifier): body(x) is the classifier's input; classifier(body(x)) == model(x). The model itself is
    left untouched (the body is a copy)."""
    name = last_linear(model)
    body = copy.deepcopy(model)
    parent_name, _, attr = name.rpartition(".")
    parent = body.get_submodule(parent_name) if parent_name else body
    classifier = getattr(parent, attr)
    setattr(parent, attr, nn.Identity())
    return body, classifier


class FeatureModel(nn.Module):
    """x -> (logits, features): features = [middle stage averaged over space, the classifier's input]."""

    def __init__(self, model: nn.Module, middle: tuple[str, str] | None):
        super().__init__()
        from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

        body, self.classifier = split_classifier(model)
        self.middle = tuple(middle) if middle else None
        if self.middle is None:  # a model without a known middle stage: the classifier's input alone
            self.body = body
        else:
            output = get_graph_node_names(body.eval())[1][-1]
            self.body = create_feature_extractor(body.eval(), {self.middle[0]: "middle", output: "last"})

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.middle is None:
            last = self.body(x)
            return self.classifier(last), last.float()
        out = self.body(x)
        pooled = out["middle"].float().mean(dim=POOL_DIMS[self.middle[1]])
        return self.classifier(out["last"]), torch.cat([pooled, out["last"].float()], dim=1)


class ScoredModel(nn.Module):
    """x -> (logits, ood_distance): the model's answer and how far its features lie from the training data."""

    def __init__(self, model: nn.Module, middle: tuple[str, str] | None, centers: torch.Tensor,
                 whitening: torch.Tensor, shift: torch.Tensor):
        super().__init__()
        self.features = FeatureModel(model, middle)
        # centers: the class means shifted and whitened (C, D); whitening: W with W W^T = the precision matrix
        # (D, D); shift: the training features' mean (D,)
        self.register_buffer("centers", centers.detach().float().clone())
        self.register_buffer("whitening", whitening.detach().float().clone())
        self.register_buffer("shift", shift.detach().float().clone())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, features = self.features(x)
        z = (features - self.shift) @ self.whitening
        squared = (z[:, None, :] - self.centers[None]).pow(2).sum(-1)  # (N, C)
        return logits, squared.min(dim=1).values.clamp_min(0).sqrt()

    @property
    def classifier(self) -> nn.Linear:
        return self.features.classifier


def scored_model(model: nn.Module, state: dict) -> ScoredModel:
    """The model with the out-of-distribution buffers of a checkpoint (`state`: FEATURE_OOD_STATE), measuring the
    features they were fitted on."""
    device = next(model.parameters()).device
    shift = state.get("shift", torch.zeros(state["whitening"].shape[0]))
    return ScoredModel(model, state.get("middle"), state["centers"], state["whitening"], shift).to(device).eval()


def answering_model(model: nn.Module, ckpt: dict) -> nn.Module:
    """The checkpoint's model as it answers: (logits, ood_distance) when the check was fitted, else logits alone."""
    state = ckpt.get(FEATURE_OOD_STATE)
    return model if state is None else scored_model(model, state)
