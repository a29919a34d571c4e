"""Hydra configs shipped inside the package, so they are found from a checkout and after `pip install .`."""
