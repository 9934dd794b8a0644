"""Wire format (SPEC §3): exact bytes, exact round trips, loud failures.

Expected byte counts are derived by hand from the layout in the ``apf_ray.wire`` docstring:
values header 6 B, mask header 5 B, sparse header 11 B, message/scalars header 2 B,
framed part 5 B + name.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from apf_ray.compression.base import QUANTIZER_CODES
from apf_ray.compression.quantize import INT8_CHUNK
from apf_ray.wire import (
    decode_downlink,
    decode_mask,
    decode_message,
    decode_scalars,
    decode_sparse,
    decode_values,
    densify,
    encode_downlink,
    encode_mask,
    encode_message,
    encode_scalars,
    encode_sparse,
    encode_values,
)


def _random(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(n).astype(np.float32)


def _read_only(buf: np.ndarray) -> np.ndarray:
    buf = buf.copy()
    buf.setflags(write=False)
    return buf


def _bits(values: np.ndarray) -> np.ndarray:
    return np.asarray(values, dtype=np.float32).view(np.uint32)


ENCODED = {
    "values": lambda: encode_values(_random(100)),
    "values_int8": lambda: encode_values(_random(100), "int8"),
    "mask": lambda: encode_mask(np.arange(13) % 3 == 0),
    "sparse_indices": lambda: encode_sparse(np.array([2, 7]), np.array([1.0, 2.0]), 1000),
    "sparse_bitmap": lambda: encode_sparse(np.arange(0, 100, 2), np.ones(50), 100),
    "message": lambda: encode_message({"values": encode_values(_random(4))}),
    "scalars": lambda: encode_scalars(num_samples=3),
}
DECODER = {
    "values": decode_values,
    "values_int8": decode_values,
    "mask": decode_mask,
    "sparse_indices": decode_sparse,
    "sparse_bitmap": decode_sparse,
    "message": decode_message,
    "scalars": decode_scalars,
}


# --------------------------------------------------------------------------- buffers in general


@pytest.mark.parametrize("kind", sorted(ENCODED))
def test_every_encoder_returns_one_contiguous_uint8_vector(kind: str) -> None:
    buf = ENCODED[kind]()
    assert buf.dtype == np.uint8 and buf.ndim == 1 and buf.flags.c_contiguous


@pytest.mark.parametrize("kind", sorted(ENCODED))
def test_decoders_accept_read_only_buffers(kind: str) -> None:
    buf = ENCODED[kind]()
    assert str(DECODER[kind](_read_only(buf))) == str(DECODER[kind](buf))


@pytest.mark.parametrize("kind", sorted(ENCODED))
def test_truncated_buffer_raises_value_error(kind: str) -> None:
    buf = ENCODED[kind]()
    with pytest.raises(ValueError, match="truncated"):
        DECODER[kind](buf[:-1])


@pytest.mark.parametrize("kind", sorted(ENCODED))
def test_trailing_bytes_raise_value_error(kind: str) -> None:
    buf = np.concatenate([ENCODED[kind](), np.zeros(3, dtype=np.uint8)])
    with pytest.raises(ValueError, match="3 trailing bytes"):
        DECODER[kind](buf)


def test_wrong_kind_of_buffer_names_expected_and_found_tag() -> None:
    with pytest.raises(ValueError, match=r"expected a mask buffer, got tag 0x56 \(values\)"):
        decode_mask(encode_values(_random(8)))
    with pytest.raises(ValueError, match=r"expected a values buffer, got tag 0x53 \(sparse\)"):
        decode_values(encode_sparse(np.array([1]), np.array([1.0]), 8))


def test_empty_buffer_raises_value_error() -> None:
    with pytest.raises(ValueError, match="expected a sparse buffer, got an empty buffer"):
        decode_sparse(np.zeros(0, dtype=np.uint8))


def test_non_uint8_buffer_raises_type_error() -> None:
    with pytest.raises(TypeError, match="1-D uint8 buffer"):
        decode_values(np.zeros(10, dtype=np.float32))


# --------------------------------------------------------------------------- dense values


def test_float32_values_cost_6_plus_4n_bytes_and_round_trip_bit_exactly() -> None:
    values = _random(1000)
    buf = encode_values(values)
    assert buf.nbytes == 6 + 4 * 1000
    assert np.array_equal(_bits(decode_values(buf)), _bits(values))


def test_decoded_values_are_fresh_writable_arrays() -> None:
    buf = _read_only(encode_values(_random(16)))
    decoded = decode_values(buf)
    assert decoded.dtype == np.float32 and decoded.flags.writeable
    assert not np.shares_memory(decoded, buf)


def test_values_header_is_tag_dtype_code_and_uint32_count() -> None:
    buf = encode_values(np.ones(258, dtype=np.float32), "bfloat16")
    assert buf[:6].tolist() == [ord("V"), 2, 2, 1, 0, 0]  # 258 = 0x0102 little-endian


def test_float16_values_cost_6_plus_2n_bytes_within_half_precision() -> None:
    values = _random(1000)
    buf = encode_values(values, "float16")
    assert buf.nbytes == 6 + 2 * 1000
    # Round-to-nearest in fp16: relative error ≤ 2**-11 for normal numbers (|x| ≥ 2**-14).
    normal = np.abs(values) >= 2.0**-14
    error = np.abs(decode_values(buf) - values)
    assert np.all(error[normal] <= np.abs(values[normal]) * 2.0**-11)


def test_float16_overflow_becomes_inf_without_a_warning() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        decoded = decode_values(encode_values(np.array([1e6, -1e6], dtype=np.float32), "float16"))
    assert decoded.tolist() == [np.inf, -np.inf]


def test_bfloat16_sends_upper_16_bits_rounded_to_nearest_even() -> None:
    values = np.array(
        [_bits_to_float(0x3F800000),  # 1.0 → 0x3F80
         _bits_to_float(0x3F808000),  # 1.00390625, halfway, 0x3F80 is even → 0x3F80
         _bits_to_float(0x3F818000),  # halfway between 0x3F81 and 0x3F82 → even 0x3F82
         _bits_to_float(0x3F808001),  # just above halfway → 0x3F81
         -2.0],  # 0xC0000000 → 0xC000
        dtype=np.float32,
    )
    buf = encode_values(values, "bfloat16")
    assert buf.nbytes == 6 + 2 * 5
    assert buf[6:].view("<u2").tolist() == [0x3F80, 0x3F80, 0x3F82, 0x3F81, 0xC000]
    assert decode_values(buf).tolist() == [1.0, 1.0, 1.015625, 1.0078125, -2.0]


def _bits_to_float(bits: int) -> float:
    return float(np.array([bits], dtype=np.uint32).view(np.float32)[0])


def test_bfloat16_keeps_nan_and_inf_and_overflows_max_float_to_inf() -> None:
    # A signalling NaN whose payload sits in the low 16 bits: truncation would make it inf.
    # Built from its bits: a round trip through a Python float would quiet it.
    bits = np.array([0x7FC00000, 0x7F800001, 0x7F800000, 0xFF800000, 0x7F7FFFFF], dtype=np.uint32)
    values = bits.view(np.float32)  # NaN, sNaN, inf, -inf, float32 max
    decoded = decode_values(encode_values(values, "bfloat16"))
    assert np.isnan(decoded[:2]).all()
    assert decoded[2:].tolist() == [np.inf, -np.inf, np.inf]


def test_bfloat16_matches_torch_cast() -> None:
    torch = pytest.importorskip("torch")
    values = _random(10_000, seed=1) * np.float32(10.0) ** np.random.default_rng(2).integers(-30, 30, 10_000)
    values = values.astype(np.float32)
    expected = torch.from_numpy(values).to(torch.bfloat16).to(torch.float32).numpy()
    assert np.array_equal(_bits(decode_values(encode_values(values, "bfloat16"))), _bits(expected))


def test_int8_costs_one_byte_per_value_plus_a_float32_scale_per_4096_chunk() -> None:
    n = 2 * INT8_CHUNK + 100  # three chunks
    buf = encode_values(_random(n), "int8")
    assert buf.nbytes == 6 + 3 * 4 + n


def test_int8_error_is_at_most_half_a_scale_in_every_chunk() -> None:
    n = 2 * INT8_CHUNK + 100
    values = _random(n) * np.repeat(np.array([1e-3, 1.0, 50.0], dtype=np.float32), INT8_CHUNK)[:n]
    decoded = decode_values(encode_values(values, "int8"))
    for start in range(0, n, INT8_CHUNK):
        chunk = slice(start, start + INT8_CHUNK)
        scale = np.abs(values[chunk]).max() / 127
        # scale/2 from rounding, plus float32 rounding of the product q·scale.
        assert np.abs(decoded[chunk] - values[chunk]).max() <= scale / 2 * (1 + 1e-5)


def test_int8_all_zero_chunk_has_scale_zero_and_decodes_to_zeros() -> None:
    values = np.concatenate([np.zeros(INT8_CHUNK, dtype=np.float32), np.array([-254.0, 127.0], dtype=np.float32)])
    buf = encode_values(values, "int8")
    assert buf[6:14].view("<f4").tolist() == [0.0, 2.0]  # scales: 0, then 254/127
    assert buf[14 + INT8_CHUNK :].view(np.int8).tolist() == [-127, 64]  # 127/2 = 63.5 → 64 (ties to even)
    assert decode_values(buf).tolist() == [0.0] * INT8_CHUNK + [-254.0, 128.0]


def test_int8_rejects_non_finite_values() -> None:
    with pytest.raises(ValueError, match="finite"):
        encode_values(np.array([1.0, np.nan], dtype=np.float32), "int8")


def test_unknown_dtype_error_names_it_and_the_allowed_ones() -> None:
    with pytest.raises(ValueError, match=r"'float8'.*float32, float16, bfloat16, int8"):
        encode_values(np.ones(3), "float8")


def test_values_must_be_a_1d_vector() -> None:
    with pytest.raises(ValueError, match=r"values must be a 1-D vector, got shape \(2, 2\)"):
        encode_values(np.ones((2, 2)))


# --------------------------------------------------------------------------- mask


def test_mask_of_13_packs_into_2_bytes_after_a_5_byte_header() -> None:
    mask = np.array([1, 0, 1, 1, 0, 0, 0, 0, 1, 1, 0, 0, 0], dtype=bool)
    buf = encode_mask(mask)
    assert buf.nbytes == 5 + 2
    assert buf.tolist() == [ord("M"), 13, 0, 0, 0, 0b10110000, 0b11000000]
    decoded = decode_mask(buf)
    assert decoded.dtype == np.bool_ and np.array_equal(decoded, mask)


def test_mask_must_be_bool() -> None:
    with pytest.raises(TypeError, match="mask must be a 1-D bool vector"):
        encode_mask(np.ones(4, dtype=np.uint8))


# --------------------------------------------------------------------------- sparse


def test_sparse_sends_uint32_indices_when_few_scalars() -> None:
    buf = encode_sparse(np.array([1, 3, 999]), np.array([0.5, -1.0, 2.0]), 1000)
    assert buf.nbytes == 11 + 3 * 4 + 3 * 4  # 12 B of indices < 125 B of bitmap
    assert buf[1] == 0  # positions flag: indices
    indices, values, n = decode_sparse(buf)
    assert indices.dtype == np.int64 and indices.tolist() == [1, 3, 999]
    assert values.dtype == np.float32 and values.tolist() == [0.5, -1.0, 2.0]
    assert n == 1000


def test_sparse_sends_a_bitmap_when_dense() -> None:
    indices = np.arange(0, 1000, 10)  # k = 100: 400 B of indices > 125 B of bitmap
    buf = encode_sparse(indices, np.arange(100, dtype=np.float32), 1000)
    assert buf.nbytes == 11 + 125 + 100 * 4
    assert buf[1] == 1  # positions flag: bitmap
    decoded_indices, values, n = decode_sparse(buf)
    assert decoded_indices.tolist() == indices.tolist()
    assert values.tolist() == list(range(100)) and n == 1000


def test_sparse_values_compose_with_int8() -> None:
    buf = encode_sparse(np.array([4, 9]), np.array([-254.0, 127.0]), 1000, "int8")
    assert buf.nbytes == 11 + 2 * 4 + 4 + 2  # header, indices, one scale, two codes
    assert decode_sparse(buf)[1].tolist() == [-254.0, 128.0]


def test_sparse_sorts_unsorted_indices_together_with_values() -> None:
    indices, values, _ = decode_sparse(encode_sparse(np.array([7, 2, 5]), np.array([70.0, 20.0, 50.0]), 10))
    assert indices.tolist() == [2, 5, 7] and values.tolist() == [20.0, 50.0, 70.0]


def test_sparse_rejects_duplicate_indices() -> None:
    with pytest.raises(ValueError, match=r"unique; repeated: \[5\]"):
        encode_sparse(np.array([5, 1, 5]), np.ones(3), 10)


def test_sparse_rejects_out_of_range_indices() -> None:
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        encode_sparse(np.array([3, 10]), np.ones(2), 10)


def test_sparse_with_nothing_sent_is_just_the_header() -> None:
    buf = encode_sparse(np.array([], dtype=np.int64), np.array([], dtype=np.float32), 1000)
    assert buf.nbytes == 11
    indices, values, n = decode_sparse(buf)
    assert indices.size == 0 and values.size == 0 and n == 1000


def test_densify_places_values_at_indices() -> None:
    assert densify(np.array([1, 3]), np.array([2.0, -1.0]), 5).tolist() == [0.0, 2.0, 0.0, -1.0, 0.0]


# --------------------------------------------------------------------------- framing


def test_message_round_trips_with_5_bytes_plus_name_per_part() -> None:
    values, mask = encode_values(_random(10)), encode_mask(np.ones(10, dtype=bool))
    buf = encode_message({"values": values, "mask": mask})
    assert buf.nbytes == 2 + (5 + 6 + values.nbytes) + (5 + 4 + mask.nbytes)
    parts = decode_message(buf)
    assert list(parts) == ["values", "mask"]
    assert np.array_equal(parts["values"], values) and np.array_equal(parts["mask"], mask)


def test_message_parts_are_zero_copy_views_of_a_read_only_buffer() -> None:
    buf = _read_only(encode_message({"a": encode_values(_random(10)), "b": encode_mask(np.ones(3, dtype=bool))}))
    parts = decode_message(buf)
    assert all(np.shares_memory(part, buf) for part in parts.values())
    assert decode_values(parts["a"]).size == 10


def test_message_rejects_non_ascii_and_overlong_names() -> None:
    with pytest.raises(ValueError, match="ASCII strings of 1-255"):
        encode_message({"größe": encode_mask(np.ones(1, dtype=bool))})
    with pytest.raises(ValueError, match="ASCII strings of 1-255"):
        encode_message({"x" * 256: encode_mask(np.ones(1, dtype=bool))})


def test_scalars_cost_13_bytes_plus_name_each_and_round_trip() -> None:
    buf = encode_scalars(num_samples=12, train_loss=0.25)
    assert buf.nbytes == 2 + (13 + 11) + (13 + 10)
    assert decode_scalars(_read_only(buf)) == {"num_samples": 12.0, "train_loss": 0.25}


def test_scalars_reject_non_numbers_naming_the_field() -> None:
    with pytest.raises(TypeError, match="scalar 'client'"):
        encode_scalars(client="a")


def test_scalars_decoder_rejects_a_message_buffer() -> None:
    with pytest.raises(ValueError, match=r"expected a scalars buffer, got tag 0x46 \(message\)"):
        decode_scalars(encode_message({}))


# --------------------------------------------------------------------------- downlink

N = 1000
FULL_FLOAT32_DOWNLINK = 2 + (5 + len("params")) + 6 + 4 * N  # 4019 B
MASK_PART = (5 + len("mask")) + 5 + N // 8  # 139 B


def _changed(indices: np.ndarray) -> np.ndarray:
    changed = np.zeros(N, dtype=bool)
    changed[indices] = True
    return changed


def test_downlink_sends_the_full_model_to_a_client_holding_nothing() -> None:
    params = _random(N)
    buf = encode_downlink(params, changed=None, mask=None)
    assert buf.nbytes == FULL_FLOAT32_DOWNLINK
    decoded, mask = decode_downlink(_read_only(buf), None, None)
    assert np.array_equal(_bits(decoded), _bits(params)) and mask is None


def test_downlink_sends_only_changed_scalars_when_that_is_smaller() -> None:
    params = _random(N)
    cached = params.copy()
    changed_at = np.array([3, 500, 999])
    cached[changed_at] = 0.0
    buf = encode_downlink(params, changed=_changed(changed_at), mask=None)
    assert buf.nbytes == 2 + (5 + 6) + (11 + 3 * 4 + 3 * 4)
    cached_before = cached.copy()
    decoded, _ = decode_downlink(buf, cached, None)
    assert np.array_equal(_bits(decoded), _bits(params))
    assert np.array_equal(cached, cached_before)  # the client's cache is not modified


def test_downlink_picks_delta_until_it_stops_being_smaller() -> None:
    # Delta with a bitmap: 11 + 125 + 4k B against 6 + 4000 B: smaller up to k = 967.
    params = _random(N)
    at_967 = encode_downlink(params, changed=_changed(np.arange(967)), mask=None)
    at_968 = encode_downlink(params, changed=_changed(np.arange(968)), mask=None)
    assert at_967.nbytes == 2 + (5 + 6) + 11 + 125 + 4 * 967  # 4017 B: the delta
    assert at_968.nbytes == FULL_FLOAT32_DOWNLINK  # the delta would be 4008 + 13 B
    cached = np.zeros(N, dtype=np.float32)
    assert np.array_equal(decode_downlink(at_968, cached, None)[0], params)


def test_downlink_adds_the_mask_bitmap_only_when_given() -> None:
    params, mask = _random(N), np.arange(N) % 3 == 0
    with_mask = encode_downlink(params, changed=None, mask=mask)
    assert with_mask.nbytes == FULL_FLOAT32_DOWNLINK + MASK_PART
    assert set(decode_message(with_mask)) == {"params", "mask"}
    assert set(decode_message(encode_downlink(params, changed=None, mask=None))) == {"params"}
    assert np.array_equal(decode_downlink(with_mask, None, None)[1], mask)


def test_downlink_without_mask_keeps_the_cached_mask() -> None:
    cached_mask = np.ones(N, dtype=bool)
    _, mask = decode_downlink(encode_downlink(_random(N), changed=None, mask=None), None, cached_mask)
    assert mask is cached_mask


def test_downlink_delta_without_cached_params_raises() -> None:
    buf = encode_downlink(_random(N), changed=_changed(np.array([1])), mask=None)
    with pytest.raises(ValueError, match="delta but the client holds no cached_params"):
        decode_downlink(buf, None, None)


def test_downlink_delta_against_a_cache_of_the_wrong_length_raises() -> None:
    buf = encode_downlink(_random(N), changed=_changed(np.array([1])), mask=None)
    with pytest.raises(ValueError, match="cached_params has length 10, expected 1000"):
        decode_downlink(buf, np.zeros(10, dtype=np.float32), None)


def test_downlink_in_bfloat16_halves_the_full_model() -> None:
    buf = encode_downlink(np.ones(N, dtype=np.float32), changed=None, mask=None, dtype="bfloat16")
    assert buf.nbytes == 2 + (5 + 6) + 6 + 2 * N
    assert decode_downlink(buf, None, None)[0].tolist() == [1.0] * N


def test_value_dtypes_are_the_four_documented_quantisers_with_codes_0_to_3() -> None:
    names = {code: q.name for code, q in sorted(QUANTIZER_CODES.items())}
    assert names == {0: "float32", 1: "float16", 2: "bfloat16", 3: "int8"}
