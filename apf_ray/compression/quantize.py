"""Quantisers: how each uploaded value is written (and the wire's value payload layouts).

=========  ====  =====================================================================
name       code  payload for m values
=========  ====  =====================================================================
float32    0     4m B, IEEE little-endian (lossless; the downlink always uses it)
float16    1     2m B, IEEE cast (|x| > 65504 becomes ±inf)
bfloat16   2     2m B, the upper 16 bits of float32, round-to-nearest-even, NaN kept NaN
int8       3     4·ceil(m/4096) B of float32 scales, then m B of int8 codes: one symmetric
                 scale max|x|/127 per chunk of 4096 values, |error| ≤ scale/2
=========  ====  =====================================================================
"""

from __future__ import annotations

from typing import Final

import numpy as np

from apf_ray.compression.base import Quantizer, register_stage

INT8_CHUNK: Final = 4096
"""Values per int8 quantisation chunk; each chunk carries its own float32 scale."""


@register_stage
class Float32(Quantizer):
    """Lossless: the values as they are."""

    name = "float32"
    code = 0

    @staticmethod
    def payload_nbytes(m: int) -> int:
        return 4 * m

    @staticmethod
    def encode(values: np.ndarray) -> np.ndarray:
        return values.astype("<f4", copy=False)

    @staticmethod
    def decode(payload: np.ndarray, m: int) -> np.ndarray:
        return payload.view("<f4").astype(np.float32)


@register_stage
class Float16(Quantizer):
    """Half precision: 2 bytes a value, about 3 significant digits."""

    name = "float16"
    code = 1

    @staticmethod
    def payload_nbytes(m: int) -> int:
        return 2 * m

    @staticmethod
    def encode(values: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):  # overflow to ±inf is the IEEE cast we document
            return values.astype("<f2")

    @staticmethod
    def decode(payload: np.ndarray, m: int) -> np.ndarray:
        return payload.view("<f2").astype(np.float32)


@register_stage
class BFloat16(Quantizer):
    """bfloat16: float32's range in 2 bytes, bit-identical to torch's conversion."""

    name = "bfloat16"
    code = 2

    @staticmethod
    def payload_nbytes(m: int) -> int:
        return 2 * m

    @staticmethod
    def encode(values: np.ndarray) -> np.ndarray:
        bits = values.view(np.uint32)
        rounded = (bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16
        quiet_nan = (bits >> 16) | np.uint32(0x0040)
        return np.where(np.isnan(values), quiet_nan, rounded).astype("<u2")

    @staticmethod
    def decode(payload: np.ndarray, m: int) -> np.ndarray:
        return (payload.view("<u2").astype(np.uint32) << 16).view(np.float32)


@register_stage
class Int8(Quantizer):
    """Symmetric int8 with one float32 scale per chunk of :data:`INT8_CHUNK` values."""

    name = "int8"
    code = 3

    @staticmethod
    def payload_nbytes(m: int) -> int:
        return m + 4 * -(-m // INT8_CHUNK)

    @staticmethod
    def encode(values: np.ndarray) -> np.ndarray:
        if not np.all(np.isfinite(values)):
            raise ValueError("int8 quantisation needs finite values; got NaN or inf")
        num_chunks = -(-values.size // INT8_CHUNK)
        padded = np.zeros(num_chunks * INT8_CHUNK, dtype=np.float32)
        padded[: values.size] = values
        scales = np.abs(padded.reshape(num_chunks, INT8_CHUNK)).max(axis=1) / np.float32(127)
        # An all-zero chunk has scale 0; dividing by 1 instead quantises its zeros to 0.
        divisor = np.repeat(np.where(scales > 0, scales, np.float32(1)), INT8_CHUNK)[: values.size]
        codes = np.clip(np.rint(values / divisor), -127, 127).astype(np.int8)
        return np.concatenate([scales.astype("<f4").view(np.uint8), codes.view(np.uint8)])

    @staticmethod
    def decode(payload: np.ndarray, m: int) -> np.ndarray:
        num_chunks = -(-m // INT8_CHUNK)
        scales = payload[: 4 * num_chunks].view("<f4").astype(np.float32)
        codes = payload[4 * num_chunks :].view(np.int8)
        return codes.astype(np.float32) * np.repeat(scales, INT8_CHUNK)[:m]
