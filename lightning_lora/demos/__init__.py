"""Demonstrations that a LoRA teaches a pretrained base something new (issue 18): bases the project trains itself,
judges that are neither the model nor its loss, and the before/after figures. Only the demo entry points
(``python -m lightning_lora.demos.pretrain``, the demo experiments' configs) import this package."""
