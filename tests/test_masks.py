"""``apf_ray.masks.mask_index``: an index that selects exactly what the boolean mask selects, so every
gather, scatter and in-place add through it is bit-identical to boolean indexing."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from apf_ray.masks import MIXED_MASK, mask_index


@settings(max_examples=60, deadline=None)
@given(size=st.integers(1, 3000), true_fraction=st.sampled_from([0.0, 0.02, 0.3, 0.5, 0.7, 0.98, 1.0]),
       seed=st.integers(0, 2**31 - 1))
def test_gathering_scattering_and_adding_through_it_equal_boolean_indexing_bit_for_bit(size, true_fraction, seed):
    rng = np.random.default_rng(seed)
    mask = rng.random(size) < true_fraction
    vec = rng.standard_normal(size).astype(np.float32)
    vec[rng.random(size) < 0.1] = -0.0  # signed zeros and NaNs must land where boolean indexing puts them
    vec[rng.random(size) < 0.05] = np.nan
    values = rng.standard_normal(int(mask.sum())).astype(np.float32)
    index = mask_index(mask)

    assert vec[index].tobytes() == vec[mask].tobytes()
    scattered, expected = vec.copy(), vec.copy()
    scattered[index] = values
    expected[mask] = values
    assert scattered.tobytes() == expected.tobytes()
    scattered[index] += values
    expected[mask] += values
    assert scattered.tobytes() == expected.tobytes()


def test_a_mixed_mask_becomes_positions_and_a_nearly_uniform_one_stays_a_mask():
    size = 10_000
    mixed = np.zeros(size, dtype=bool)
    mixed[: int(size * MIXED_MASK)] = True
    assert mask_index(mixed).dtype == np.int64 and mask_index(mixed).size == int(size * MIXED_MASK)
    nearly_all = ~mixed
    nearly_all[0] = True  # one False fewer than the mixed fraction
    assert mask_index(nearly_all) is nearly_all
    nearly_none = ~nearly_all
    assert mask_index(nearly_none) is nearly_none
