"""Model code that the heads build on. Each family lives in its own subpackage (e.g. ``models.trellis``)."""
