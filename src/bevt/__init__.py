"""BEVT: BERT pretraining of video transformers, for the Hugging Face ecosystem."""

__version__ = "0.1.0"
