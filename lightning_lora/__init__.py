"""lightning_lora: LoRA fine-tuning through PyTorch Lightning and Hydra, with adapters the ecosystem loads."""

from lightning_lora.config import register_resolvers

__version__ = "0.1.0"

register_resolvers()
