"""The model zoo: every network of METHOD.md section 2, created by name."""
from models import resnet, resnet_cifar, vgg  # noqa: F401  (registers the entrypoints)
from models.registry import ModelInfo, create_model, list_models, model_info, register_model

__all__ = ["ModelInfo", "create_model", "list_models", "model_info", "register_model"]
