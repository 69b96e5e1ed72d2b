"""Self-supervised and multimodal pretraining on shared backbones."""
__version__ = "0.1.0"
