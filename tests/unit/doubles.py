"""Test doubles shared by unit tests of pure logic (the real models are tested in the integration tier)."""

from __future__ import annotations

import hashlib
import re

import numpy as np


class HashingEncoder:
    """A deterministic stand-in embedder: hashed bag of words, L2-normalised (no model needed)."""

    dim = 128

    def encode(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, text in enumerate(texts):
            for word in re.findall(r"[a-z0-9]+", text.lower()):
                out[i, int(hashlib.md5(word.encode()).hexdigest(), 16) % self.dim] += 1.0
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)
