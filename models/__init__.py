"""Models: the zoo table and its builders."""
from models.zoo import (
    MODEL_SPECS,
    ModelSpec,
    build_model,
    expected_trainable,
    get_spec,
    model_names,
    trainable_parameter_names,
)

__all__ = ["MODEL_SPECS", "ModelSpec", "build_model", "expected_trainable", "get_spec",
           "model_names", "trainable_parameter_names"]
