"""The model zoo: image classifiers (:mod:`.images`) and a causal Transformer (:mod:`.transformer`).

``build_model`` builds the image models by name (:data:`MODEL_NAMES`);
``build_transformer`` the language model.
"""

from experiments.models.images import BUILDERS, MODEL_NAMES, build_model, deep_cnn, mlp, small_cnn
from experiments.models.transformer import CausalTransformer, build_transformer

__all__ = ["BUILDERS", "MODEL_NAMES", "CausalTransformer", "build_model", "build_transformer", "deep_cnn", "mlp",
           "small_cnn"]
