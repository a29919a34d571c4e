"""Hydra configs (the repository's conf/); a wheel ships them as the package ``lightning_lora.conf``."""
