"""Uplink compression: Top-k and Gaia with error feedback, quantisers, and the chain that composes them."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from apf_ray.compression import UPLINK_STAGES, stage_class
from apf_ray.compression.gaia import Gaia
from apf_ray.compression.topk import TopK
from apf_ray.uplink import RESIDUAL, OptionsError, UplinkChain, build_stages
from apf_ray.wire import decode_sparse, decode_values, densify


def _random(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(n).astype(np.float32)


def _compress(chain: UplinkChain, update, residual=None, weights=None, round_index: int = 0, mask=None):
    """(wire buffer, new residual) of one upload through ``chain``."""
    update = np.asarray(update, dtype=np.float32)
    state = {} if residual is None else {RESIDUAL: np.asarray(residual, dtype=np.float32)}
    weights = np.ones(update.size, np.float32) if weights is None else np.asarray(weights, np.float32)
    buf = chain.encode(update, mask, weights, round_index, state)
    return buf, state.get(RESIDUAL)


def topk(ratio: float, *quantiser: str) -> UplinkChain:
    return UplinkChain.from_spec([{"name": "topk", "ratio": ratio}, *quantiser])


def gaia(**options: float) -> UplinkChain:
    return UplinkChain.from_spec([{"name": "gaia", **options}])


# --------------------------------------------------------------------------- Top-k with error feedback


def test_topk_sends_exactly_k_largest_magnitudes() -> None:
    update = np.arange(1, 101, dtype=np.float32) * np.where(np.arange(100) % 2, -1, 1)
    buf, _ = _compress(topk(0.07), update)  # 0.07·100 is 7.000000000000001
    indices, values, n = decode_sparse(buf)
    assert indices.tolist() == list(range(93, 100)) and n == 100
    assert values.tolist() == update[93:].tolist()


def test_topk_sends_at_least_one_scalar() -> None:
    buf, _ = _compress(topk(1e-9), _random(50))
    assert decode_sparse(buf)[0].size == 1


def test_topk_residual_plus_sent_equals_corrected_exactly() -> None:
    update, residual = _random(1000, seed=3), _random(1000, seed=4)
    corrected = update + residual
    buf, new_residual = _compress(topk(0.1), update, residual)
    sent = densify(*decode_sparse(buf))
    assert np.count_nonzero(sent) == 100
    assert np.array_equal(new_residual + sent, corrected)
    assert np.all(new_residual[sent != 0] == 0)


def test_topk_error_feedback_eventually_sends_the_whole_update() -> None:
    update = _random(10, seed=5)
    chain = topk(0.1)  # k = 1 of 10
    total, residual = np.zeros(10, dtype=np.float32), None
    for round_update in [update] + [np.zeros(10, dtype=np.float32)] * 9:
        buf, residual = _compress(chain, round_update, residual)
        total += densify(*decode_sparse(buf))
    assert np.array_equal(total, update) and not residual.any()


def test_topk_breaks_ties_towards_lower_indices() -> None:
    buf, _ = _compress(topk(0.4), [1.0, 3.0, -3.0, 3.0, 5.0])
    assert decode_sparse(buf)[0].tolist() == [1, 4]


def test_topk_feeds_back_quantisation_error() -> None:
    update = _random(100, seed=6)
    buf, residual = _compress(topk(0.5, "int8"), update)
    indices, sent, _ = decode_sparse(buf)
    assert np.array_equal(residual[indices], update[indices] - sent)
    assert residual[indices].any()  # int8 is lossy, so something was held back


@pytest.mark.parametrize("ratio", [0, -0.1, 1.5, float("nan")])
def test_topk_ratio_must_be_in_unit_interval(ratio: float) -> None:
    with pytest.raises(OptionsError, match="ratio"):
        topk(ratio)


# --------------------------------------------------------------------------- Gaia significance filter


def test_gaia_sends_only_significant_relative_updates() -> None:
    weights = np.array([1.0, 1.0, 100.0, -2.0], dtype=np.float32)
    update = np.array([0.02, 0.006, 0.6, -0.03], dtype=np.float32)  # |Δ/w| = 2%, 0.6%, 0.6%, 1.5%
    buf, residual = _compress(gaia(threshold=0.01, decay=1.0), update, weights=weights)
    indices, values, _ = decode_sparse(buf)
    assert indices.tolist() == [0, 3] and values.tolist() == update[[0, 3]].tolist()
    assert residual.tolist() == [0.0, update[1], update[2], 0.0]


def test_gaia_accumulates_insignificant_updates_until_they_matter() -> None:
    weights = np.array([1.0, 100.0], dtype=np.float32)
    update = np.array([0.006, 0.6], dtype=np.float32)  # 0.6% each round, 1.2% after two
    chain = gaia(threshold=0.01, decay=1.0)
    first, residual = _compress(chain, update, weights=weights)
    assert decode_sparse(first)[0].size == 0
    second, residual = _compress(chain, update, residual, weights=weights, round_index=1)
    indices, values, _ = decode_sparse(second)
    assert indices.tolist() == [0, 1] and values.tolist() == (update + update).tolist()
    assert not residual.any()


def test_gaia_threshold_decays_geometrically_down_to_the_floor() -> None:
    g = Gaia(Gaia.Options(threshold=0.01, decay=0.5, min_threshold=0.002))
    assert [g.threshold_at(r) for r in range(4)] == [0.01, 0.005, 0.0025, 0.002]
    assert g.threshold_at(1000) == 0.002


def test_gaia_default_schedule_starts_at_1_percent_and_floors_at_0_1_percent() -> None:
    g = Gaia()
    assert g.threshold_at(0) == 0.01
    assert g.threshold_at(229) > 0.001 and g.threshold_at(230) == 0.001


def test_gaia_zero_weight_is_significant_iff_the_update_is_nonzero() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        buf, residual = _compress(gaia(), [0.0, 1e-12, -3.0], weights=np.zeros(3))
    assert decode_sparse(buf)[0].tolist() == [1, 2]
    assert not residual.any()


@pytest.mark.parametrize(
    ("options", "field"),
    [({"threshold": 0.0}, "threshold"), ({"decay": 1.5}, "decay"), ({"min_threshold": 0.5}, "min_threshold")],
)
def test_gaia_rejects_bad_options_by_name(options: dict[str, float], field: str) -> None:
    with pytest.raises(OptionsError, match=field):
        gaia(**options)


@pytest.mark.parametrize("chain", [topk(0.5), gaia()], ids=["topk", "gaia"])
def test_sparsifiers_refuse_non_finite_updates(chain: UplinkChain) -> None:
    with pytest.raises(ValueError, match="NaN or inf"):
        _compress(chain, [1.0, np.inf])


# --------------------------------------------------------------------------- the chain


def test_without_a_sparsifier_the_synchronised_values_travel_densely_in_flat_order() -> None:
    update, mask = _random(10), np.arange(10) % 3 != 0
    buf, residual = _compress(UplinkChain.from_spec(["float16"]), update, mask=mask)
    assert residual is None
    assert decode_values(buf).tolist() == update[mask].astype(np.float16).astype(np.float32).tolist()


def test_apf_mask_then_topk_then_int8_sends_k_of_the_active_scalars_only() -> None:
    n = 1000
    update = _random(n, seed=8)
    mask = np.random.default_rng(9).random(n) < 0.4  # the active scalars
    chain = topk(0.1, "int8")
    buf, residual = _compress(chain, update, mask=mask)
    positions, _, m = decode_sparse(buf)
    assert m == mask.sum() and positions.size == int(np.ceil(0.1 * m))
    assert not residual[~mask].any()  # frozen scalars hold nothing back
    synced = chain.decode(buf, int(mask.sum()))  # the active scalars' update, compact
    assert synced.shape == (mask.sum(),) and np.count_nonzero(synced) == positions.size
    assert np.abs(synced + residual[mask] - update[mask]).max() < 1e-6


def test_residual_at_frozen_scalars_is_kept_for_when_they_thaw() -> None:
    chain = topk(0.5)
    residual = np.array([0.5, 0.25, 0.125, 1.0], np.float32)
    mask = np.array([True, True, False, True])
    _, new = _compress(chain, np.zeros(4), residual, mask=mask)
    assert new[2] == 0.125  # untouched while frozen


def test_decode_rejects_a_container_of_the_wrong_kind_or_size() -> None:
    dense, sparse = UplinkChain(), topk(0.5)
    buf, _ = _compress(sparse, _random(8))
    with pytest.raises(ValueError, match="expected a values buffer"):
        dense.decode(buf, 8)
    buf, _ = _compress(dense, _random(8))
    with pytest.raises(ValueError, match="8 values, the round synchronises 6"):
        dense.decode(buf, 6)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (["int8", "topk"], "at most one sparsifier then at most one quantiser"),
        (["topk", "gaia"], "at most one sparsifier"),
        (["zstd"], "unknown uplink stage 'zstd'"),
        ([{"name": "topk", "ratio": 0.1, "k": 3}], "k"),
        ([{"ratio": 0.1}], "a mapping with a 'name'"),
    ],
)
def test_bad_chains_are_refused_with_the_reason(spec: list, message: str) -> None:
    with pytest.raises(OptionsError, match=message):
        build_stages(spec)


def test_builtin_stages_are_registered_and_a_user_stage_resolves_by_import_path() -> None:
    assert {"topk", "gaia", "float32", "float16", "bfloat16", "int8"} <= set(UPLINK_STAGES)
    assert stage_class("apf_ray.compression.topk:TopK") is TopK
