"""BEVT: BERT pretraining of video transformers, for the Hugging Face ecosystem.

Importing `bevt` registers its classes with the Transformers Auto classes (AutoConfig, AutoModel,
AutoModelForVideoClassification, AutoModelForPreTraining), so saved folders load with the Auto API.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForPreTraining,
    AutoModelForVideoClassification,
)

from .configuration_bevt import PRESETS, BEVTConfig
from .modeling_bevt import (
    BEVTForMaskedVideoModeling,
    BEVTForVideoClassification,
    BEVTMaskedVideoModelingOutput,
    BEVTModel,
    BEVTModelOutput,
    BEVTPreTrainedModel,
)

__version__ = "0.1.0"

AutoConfig.register(BEVTConfig.model_type, BEVTConfig, exist_ok=True)
AutoModel.register(BEVTConfig, BEVTModel, exist_ok=True)
AutoModelForVideoClassification.register(BEVTConfig, BEVTForVideoClassification, exist_ok=True)
AutoModelForPreTraining.register(BEVTConfig, BEVTForMaskedVideoModeling, exist_ok=True)

# Saved folders carry the code and an `auto_map`, so they also load with trust_remote_code=True without bevt.
BEVTConfig.register_for_auto_class()
BEVTModel.register_for_auto_class("AutoModel")
BEVTForVideoClassification.register_for_auto_class("AutoModelForVideoClassification")
BEVTForMaskedVideoModeling.register_for_auto_class("AutoModelForPreTraining")

__all__ = [
    "PRESETS",
    "BEVTConfig",
    "BEVTModel",
    "BEVTPreTrainedModel",
    "BEVTForMaskedVideoModeling",
    "BEVTForVideoClassification",
    "BEVTModelOutput",
    "BEVTMaskedVideoModelingOutput",
]

# --- other components register below (tokenizer, video processor) ---
