"""The Hydra configs live in the repository's top-level ``conf/``; the wheel carries them as ``lightning_lora/conf``
(package data), so they are found after a plain ``pip install .`` too. Everything else is in pyproject.toml."""

from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["lightning_lora*"]), "lightning_lora.conf"],
      package_dir={"lightning_lora.conf": "conf"})
