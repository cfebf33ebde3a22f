"""The two checks fitted on a trained model before anyone is answered with it, stored in its checkpoint:

- the feature-space out-of-distribution score (models.features.ScoredModel): class means and a shared covariance
  of the features (models.features.FeatureModel) of the training split, Ledoit-Wolf shrunk (a few hundred images
  against 768 or more features leave the plain covariance singular); its limit is a percentile of the validation split's
  distances (config ood.percentile), so that share of in-distribution images is the documented false-alarm rate;
- the split-conformal thresholds (core.conformal) on the validation split's probabilities at config
  conformal.alpha.

train.py runs it on best_model.pth when training ends; evaluate.py --fit-checks runs it on an older checkpoint.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from core.checkpoint import load_checkpoint, save_checkpoint
from core.conformal import CONFORMAL_KEY, fit_conformal
from core.errors import UserError
from core.feature_ood import FEATURE_OOD_KEY, OOD_OUTPUT, QUANTILES
from data.dataset import build_dataset, make_loader
from data.preprocess import Preprocessor
from models.features import FEATURE_OOD_STATE, MIDDLE_LAYERS, FeatureModel
from models.loading import model_from_checkpoint

if TYPE_CHECKING:
    from core.config import Config
    from data.manifest import Split

EIGEN_FLOOR = 1e-6  # the smallest covariance eigenvalue kept, relative to the largest
FLOAT32_RESOLUTION = 1e-5  # a feature spread smaller than this share of the features' size is rounding noise
METHOD = ("Mahalanobis distance of the features (a middle stage averaged over space, and the classifier's input) "
          "to the nearest class mean, shared covariance of the training split (Ledoit-Wolf shrinkage)")


@torch.no_grad()
def split_features(cfg: Config, split: Split, name: str, model: FeatureModel, pre, img_size: int,
                   device) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(features (N, D), true labels, softmax probabilities) of one split, without augmentation."""
    dataset = build_dataset(cfg, split, name, img_size)
    if len(dataset) == 0:
        raise UserError(f"the {name} split of {split.manifest_path} is empty: the answer checks need it")
    feats, labels, probs = [], [], []
    for images, targets in make_loader(dataset, cfg, cfg.recipe.batch_size, device=device):
        logits, f = model(pre(images.to(device)))
        feats.append(f.cpu())
        probs.append(torch.softmax(logits.float(), dim=1).cpu())
        labels.append(targets)
    return torch.cat(feats).double().numpy(), torch.cat(labels).numpy(), torch.cat(probs).numpy()


@dataclass
class MahalanobisFit:
    centers: np.ndarray    # the class means, shifted and whitened (C, D)
    whitening: np.ndarray  # W with W W^T = the precision matrix (D, D)
    shift: np.ndarray      # the training features' mean (D,), taken off before whitening
    shrinkage: float       # Ledoit-Wolf's


def mahalanobis_fit(features: np.ndarray, labels: np.ndarray, n_classes: int) -> MahalanobisFit:
    """Class means and the shared within-class covariance of the features, shrunk by Ledoit-Wolf, its eigenvalues
    floored at EIGEN_FLOOR of the largest: a float32 feature differs by ~1e-7 between runtimes, and W amplifies that
    by at most the square root of the condition number, so every flavor measures the same distance."""
    from sklearn.covariance import LedoitWolf

    missing = [k for k in range(n_classes) if not (labels == k).any()]
    if missing:
        raise UserError(f"classes {missing} have no training images: no class mean to measure distances from")
    means = np.stack([features[labels == k].mean(axis=0) for k in range(n_classes)])
    lw = LedoitWolf(assume_centered=True).fit(features - means[labels])
    eigenvalues, vectors = np.linalg.eigh((lw.covariance_ + lw.covariance_.T) / 2)
    # features that vary less than float32 can tell apart (a barely trained model, identical images) give a
    # distance that is rounding noise: each runtime would measure another one
    if not eigenvalues.max() > (FLOAT32_RESOLUTION * np.abs(features).max()) ** 2:
        raise UserError("the training features have no usable covariance: they hardly vary between images (too few "
                        "or identical images, or a model trained too little)")
    whitening = vectors / np.sqrt(np.maximum(eigenvalues, eigenvalues.max() * EIGEN_FLOOR))
    shift = features.mean(axis=0)  # off first: whitened features would be large beside their differences
    return MahalanobisFit((means - shift) @ whitening, whitening, shift, float(lw.shrinkage_))


def mahalanobis(features: np.ndarray, fit: MahalanobisFit) -> np.ndarray:
    """The distance of each feature vector to its nearest class mean (the same sum ScoredModel computes)."""
    z = (features - fit.shift) @ fit.whitening
    return np.sqrt(((z[:, None, :] - fit.centers[None]) ** 2).sum(-1).min(axis=1))


def fit_answer_checks(cfg: Config, ckpt: dict, split: Split, device) -> dict:
    """The checkpoint's new keys: the OOD buffers (tensors) and the contract extras of both checks."""
    middle = MIDDLE_LAYERS.get(ckpt["model_name"])
    model = FeatureModel(model_from_checkpoint(ckpt, device), middle).to(device).eval()
    pre = Preprocessor(ckpt["mean"], ckpt["std"]).to(device).eval()
    size, names = ckpt["img_size"], list(ckpt["class_names"])
    train_f, train_y, _ = split_features(cfg, split, "train", model, pre, size, device)
    val_f, val_y, val_p = split_features(cfg, split, "val", model, pre, size, device)
    fit = mahalanobis_fit(train_f, train_y, len(names))
    val_d = mahalanobis(val_f, fit)
    percentile = cfg.ood.percentile
    ood = {"method": METHOD, "output": OOD_OUTPUT,
           "layers": ([f"{middle[0]} (averaged over space)"] if middle else []) + ["the classifier's input"],
           "feature_dim": int(train_f.shape[1]),
           "n_train": int(len(train_y)), "shrinkage": round(fit.shrinkage, 6), "eigen_floor": EIGEN_FLOOR,
           "percentile": percentile,
           "limit": round(float(np.percentile(val_d, percentile)), 6),
           "validation_distances": {"n": int(len(val_d)),
                                    **{k: round(float(np.percentile(val_d, q)), 6) for k, q in QUANTILES.items()}}}
    extra = {**(ckpt.get("contract_extra") or {}), FEATURE_OOD_KEY: ood,
             CONFORMAL_KEY: fit_conformal(val_y, val_p, names, cfg.conformal.alpha)}
    state = {"centers": torch.from_numpy(fit.centers).float(), "whitening": torch.from_numpy(fit.whitening).float(),
             "shift": torch.from_numpy(fit.shift).float(),
             **({"middle": list(middle)} if middle else {})}
    return {FEATURE_OOD_STATE: state, "contract_extra": extra}


def attach_answer_checks(cfg: Config, ckpt_path, split: Split, device, log=print, required: bool = False) -> dict:
    """Fit both checks for the checkpoint at ckpt_path and rewrite it (atomically) with them; its new extras. A
    split they cannot be fitted on (no validation images, a class without training images) leaves the checkpoint as
    it was and says why, unless `required` (then UserError): training has still succeeded."""
    ckpt = load_checkpoint(ckpt_path)
    try:
        ckpt.update(fit_answer_checks(cfg, ckpt, split, device))
    except UserError as exc:
        if required:
            raise
        log(f"⚠️  No out-of-distribution check or conformal sets for this model: {exc}")
        return ckpt.get("contract_extra") or {}
    save_checkpoint(ckpt, ckpt_path)
    ood, conf = ckpt["contract_extra"][FEATURE_OOD_KEY], ckpt["contract_extra"][CONFORMAL_KEY]
    log(f"🛡️  Out-of-distribution limit: feature distance {ood['limit']:.3f} (the validation split's "
        f"{ood['percentile']:g}th percentile); conformal sets at {conf['coverage_target']:.0%} coverage "
        f"({'per class' if conf['class_conditional'] else 'one threshold for all classes'})")
    return ckpt["contract_extra"]
