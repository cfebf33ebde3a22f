"""The penultimate-layer features of any model of the zoo, and the model with its out-of-distribution score.

Every model of the zoo ends in one nn.Linear (the classifier) applied to a flat feature vector. `split_classifier`
cuts the model there: the body (a copy whose last Linear is an identity) gives the features, the Linear turns
them into logits, exactly as the whole model does. `ScoredModel` returns (logits, ood_distance): the Mahalanobis
distance of the features to the nearest class mean under the training split's shared covariance (Lee et al.,
2018). The class means and the whitening matrix are buffers of the module, so the distance travels inside the
checkpoint's tensors and the ONNX graph's weights: a runtime needs no extra file and computes it the same way.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

FEATURE_OOD_STATE = "feature_ood_state"  # the checkpoint key of the buffers {"centers", "whitening"}


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


class ScoredModel(nn.Module):
    """x -> (logits, ood_distance): the model's answer and how far its features lie from the training data."""

    def __init__(self, model: nn.Module, centers: torch.Tensor, whitening: torch.Tensor):
        super().__init__()
        self.body, self.classifier = split_classifier(model)
        # centers: the class means already whitened (C, D); whitening: W with W W^T = the precision matrix (D, D)
        self.register_buffer("centers", centers.detach().float().clone())
        self.register_buffer("whitening", whitening.detach().float().clone())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.body(x)
        z = features.float() @ self.whitening
        squared = (z[:, None, :] - self.centers[None]).pow(2).sum(-1)  # (N, C)
        return self.classifier(features), squared.min(dim=1).values.clamp_min(0).sqrt()


def scored_model(model: nn.Module, state: dict) -> ScoredModel:
    """The model with the out-of-distribution buffers of a checkpoint (`state`: FEATURE_OOD_STATE)."""
    device = next(model.parameters()).device
    return ScoredModel(model, state["centers"], state["whitening"]).to(device).eval()

