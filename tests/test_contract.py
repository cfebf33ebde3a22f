"""The preprocessing contract: one object, the same after every form it travels in."""
from __future__ import annotations

import json

import pytest

from core.contract import DECODE_RULE, Contract, ContractError


def sample() -> Contract:
    return Contract("resnet18", ["glioma", "meningioma", "pituitary"], 64, [0.2, 0.2, 0.2], [0.3, 0.3, 0.3],
                    data_fingerprint="abc123", split_manifest="splits/m.csv", checkpoint_epoch=7)


def test_round_trips_through_every_form():
    c = sample()
    assert Contract.from_json(c.to_json()) == c
    assert Contract.from_onnx_metadata(c.to_onnx_metadata()) == c
    props = c.to_onnx_metadata()
    assert all(isinstance(v, str) for v in props.values())  # ONNX metadata_props hold strings only
    ckpt = {**c.checkpoint_fields(), "epoch": 7}
    assert Contract.from_checkpoint(ckpt) == c


def test_json_form_describes_input_and_output_for_integrators():
    d = json.loads(sample().to_json())
    assert d["input"]["shape"] == ["batch", 3, 64, 64] and d["input"]["dtype"] == "float32"
    assert "softmax" in d["output"]["kind"] and "grayscale" in d["preprocessing"]


def test_contracts_of_older_exports_still_load():
    """Artifacts exported before the decode rule was recorded: the five required keys, JSON-valued."""
    old = {"model_name": '"resnet18"', "class_names": '["a", "b"]', "img_size": "64", "mean": "[0.1, 0.1, 0.1]",
           "std": "[0.2, 0.2, 0.2]", "preprocessing": '"8-bit grayscale ..."', "producer": "not json"}
    c = Contract.from_onnx_metadata(old)
    assert c.class_names == ("a", "b") and c.decode == DECODE_RULE


def test_incomplete_or_invalid_contracts_are_refused():
    with pytest.raises(ContractError, match="missing img_size"):
        Contract.from_dict({"model_name": "m", "class_names": ["a"], "mean": [0] * 3, "std": [1] * 3})
    with pytest.raises(ContractError, match="invalid contract"):
        Contract("m", ["a"], 0, [0] * 3, [1] * 3)


def test_an_artifact_made_with_another_decode_rule_is_refused():
    other = Contract("m", ["a", "b"], 32, [0] * 3, [1] * 3, decode="gray8-v1")
    with pytest.raises(ContractError, match="decode rule"):
        other.check_decode("model.onnx")
