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

# Video processor and mask generators (processing_bevt.py, masking.py).
from transformers import AutoVideoProcessor  # noqa: E402

from .masking import BlockMaskGenerator, TubeMaskGenerator, save_mask_grid  # noqa: E402
from .processing_bevt import BEVTVideoProcessor  # noqa: E402

AutoVideoProcessor.register(BEVTConfig, BEVTVideoProcessor, exist_ok=True)
BEVTVideoProcessor.register_for_auto_class("AutoVideoProcessor")  # copied next to saved models
__all__ += ["BEVTVideoProcessor", "BlockMaskGenerator", "TubeMaskGenerator", "save_mask_grid"]

# Visual tokenizer (configuration_tokenizer.py, modeling_tokenizer.py, safe_loading.py, convert_tokenizer.py).
from .configuration_tokenizer import BEVTVisualTokenizerConfig  # noqa: E402
from .modeling_tokenizer import BEVTVisualTokenizer, BEVTVisualTokenizerOutput  # noqa: E402
from .safe_loading import UnsafeCheckpointError, load_checkpoint, load_state_dict_file  # noqa: E402

AutoConfig.register(BEVTVisualTokenizerConfig.model_type, BEVTVisualTokenizerConfig, exist_ok=True)
AutoModel.register(BEVTVisualTokenizerConfig, BEVTVisualTokenizer, exist_ok=True)
# No register_for_auto_class here: Transformers writes the auto_map of any class named "*Tokenizer*" as a
# (slow, fast) text-tokenizer pair, which breaks remote-code loading. Tokenizer folders load with bevt imported.
__all__ += [
    "BEVTVisualTokenizerConfig",
    "BEVTVisualTokenizer",
    "BEVTVisualTokenizerOutput",
    "UnsafeCheckpointError",
    "load_checkpoint",
    "load_state_dict_file",
]
