"""Hypothesis strategies shared by the kernel and method exactness tests."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import strategies as st

OVERLAPS = ["fill", "strict"]

# deltas from a small set: ties and zeros happen often
SMALL_VALUES = [0.0, 0.0, 1.0, -1.0, 2.0, -2.0, 0.5, -0.5, 3.0, 0.1, -0.1]


@st.composite
def cabs_cases(draw, min_n=0):
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.lists(st.integers(1, 6), min_size=ndim, max_size=ndim)))
    m = draw(st.integers(1, 16))
    k = draw(st.integers(1, 5))
    n = draw(st.lists(st.integers(min_n, m), min_size=k, max_size=k))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    numel = int(np.prod(shape))
    vals = np.array(SMALL_VALUES, dtype=np.float32)
    base = torch.from_numpy(rng.choice(vals, size=numel).reshape(shape))
    models = [
        base + torch.from_numpy(rng.choice(vals, size=numel).reshape(shape))
        for _ in range(k)
    ]
    weights = draw(
        st.lists(st.sampled_from([1.0, 0.5, -1.0, 0.3, 1.7, 0.0]), min_size=k, max_size=k)
    )
    lam = draw(st.sampled_from([1.0, 0.7, 2.0, -0.4]))
    overlap = draw(st.sampled_from(OVERLAPS))
    conflict_aware = draw(st.booleans())
    return base, models, weights, n, m, overlap, conflict_aware, lam
