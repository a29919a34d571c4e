"""A toy fourth family, added the way docs/adding-a-family.md says: a head, a model file, a data file, two presets
and one row in tests/families.py, with no change to any shared file of the package. It lives under tests/ so
that it does not ship; a family inside the package puts the same files at lightning_lora/heads/, models/, data/
and conf/, where they are found without an entry point."""
