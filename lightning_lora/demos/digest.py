"""Demo data folders are named by a digest of what their definitions make, so a changed definition writes a new
folder instead of silently reusing the old one."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np


def arrays_digest(arrays: Iterable[np.ndarray]) -> str:
    """8 hex digits of the arrays' dtypes, shapes and bytes (a demo folder's name carries the digest of a few objects
    its definitions make)."""
    digest = hashlib.sha256()
    for array in arrays:
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype}{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()[:8]
