"""Wire format: the exact bytes a federated round puts on the network (SPEC §3).

This module only lays bytes out — containers, bitmaps, framing; *what* is sent is decided
by strategies and sparsifiers, and *how each value is written* by the quantisers in
:mod:`apf_ray.compression.quantize`, whose payloads the value containers carry.

Every encoder returns one 1-D contiguous ``np.uint8`` array, header included, so
``buf.nbytes`` *is* the byte count the metrics report — never a pickle size or an estimate.
Decoders accept any 1-D uint8 array, including the read-only arrays the Ray object store
hands out, never write into it, and return fresh writable arrays (``decode_message`` is the
exception: it returns zero-copy views, so framing costs no copy). A one-byte tag opens every
buffer, so decoding the wrong kind fails loudly; lengths are checked exactly, so a truncated
or padded buffer fails too.

Wire layout (integers little-endian; n, k and part lengths are uint32):

=========  =========================================================  ===================
kind       header                                                     payload
=========  =========================================================  ===================
values     ``'V'`` u8, dtype u8, n u32                        (6 B)   n values
mask       ``'M'`` u8, n u32                                  (5 B)   ceil(n/8) B bitmap
sparse     ``'S'`` u8, positions u8, dtype u8, n u32, k u32  (11 B)   positions, k values
message    ``'F'`` u8, part count u8                          (2 B)   parts
scalars    ``'K'`` u8, value count u8                         (2 B)   parts of 8 B each
=========  =========================================================  ===================

- dtype: the quantiser's wire code (0 float32, 1 float16, 2 bfloat16, 3 int8); the payload
  layout of each is documented in :mod:`apf_ray.compression.quantize`.
- Bitmaps are ``np.packbits`` (first element in the most significant bit of byte 0).
- Sparse positions: 0 = k uint32 indices (4k B), 1 = bitmap (ceil(n/8) B); the encoder takes
  indices iff 4k < ceil(n/8). Values follow in increasing index order.
- A framed part is: name length u8, ASCII name, payload length u32, payload (5 B + name).
  Scalars are framed the same way with float64 payloads.

Hand-checked sizes: 1000 float32 values → 6 + 4000 = 4006 B; a 13-element mask → 5 + 2 = 7 B;
3 float32 values out of n = 1000 → 11 + 12 + 12 = 35 B; a full float32 downlink of n values
→ 2 + (1 + 6 + 4) + 6 + 4n B, plus 2 + (1 + 4 + 4) + 5 + ceil(n/8) B of ``"mask"`` part.
"""

from __future__ import annotations

import numbers
import struct
from collections.abc import Mapping
from typing import Final

import numpy as np

from apf_ray.compression.base import QUANTIZER_CODES, quantizer

_MAX_COUNT: Final = 2**32 - 1
_MAX_PARTS: Final = 255

_TAG_VALUES: Final = ord("V")
_TAG_MASK: Final = ord("M")
_TAG_SPARSE: Final = ord("S")
_TAG_MESSAGE: Final = ord("F")
_TAG_SCALARS: Final = ord("K")
_KIND_BY_TAG: Final = {
    _TAG_VALUES: "values",
    _TAG_MASK: "mask",
    _TAG_SPARSE: "sparse",
    _TAG_MESSAGE: "message",
    _TAG_SCALARS: "scalars",
}

_VALUES_HEADER: Final = struct.Struct("<BBI")
_MASK_HEADER: Final = struct.Struct("<BI")
_SPARSE_HEADER: Final = struct.Struct("<BBBII")
_FRAME_HEADER: Final = struct.Struct("<BB")
_PART_LENGTH: Final = struct.Struct("<I")

_POSITIONS_INDICES: Final = 0
_POSITIONS_BITMAP: Final = 1

_DOWNLINK_PARAMS: Final = "params"
_DOWNLINK_MASK: Final = "mask"


# --------------------------------------------------------------------------- validation


def _dtype_code(dtype: str) -> int:
    return quantizer(dtype).code


def _count(value: int, name: str) -> int:
    """A length that must fit the uint32 header fields."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not 0 <= value <= _MAX_COUNT:
        raise ValueError(f"{name} must be in [0, {_MAX_COUNT}], got {value}")
    return int(value)


def _float32_vector(values: np.ndarray, name: str) -> np.ndarray:
    """A contiguous float32 view (or copy) of a 1-D real vector."""
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D vector, got shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise TypeError(f"{name} must be a real numeric vector, got dtype {arr.dtype}")
    _count(arr.size, f"length of {name}")
    return np.ascontiguousarray(arr, dtype=np.float32)


def _real(value: float, name: str) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    return float(value)


def _bool_vector(values: np.ndarray, name: str, n: int | None = None) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1 or arr.dtype != np.bool_:
        raise TypeError(f"{name} must be a 1-D bool vector, got dtype {arr.dtype} shape {arr.shape}")
    if n is not None and arr.size != n:
        raise ValueError(f"{name} has length {arr.size}, expected {n}")
    _count(arr.size, f"length of {name}")
    return arr


def _same_length(values: np.ndarray, name: str, n: int) -> np.ndarray:
    vec = _float32_vector(values, name)
    if vec.size != n:
        raise ValueError(f"{name} has length {vec.size}, expected {n}")
    return vec


# --------------------------------------------------------------------------- byte plumbing


def _join(header: bytes, *payloads: np.ndarray) -> np.ndarray:
    """One contiguous uint8 buffer: header bytes followed by the payloads' raw bytes."""
    return np.concatenate(
        [np.frombuffer(header, dtype=np.uint8)] + [p.reshape(-1).view(np.uint8) for p in payloads]
    )


def _open(buf: np.ndarray, tag: int, header: struct.Struct) -> tuple[np.ndarray, tuple[int, ...]]:
    """Check type, tag and header length; return the contiguous buffer and its header fields."""
    if not isinstance(buf, np.ndarray) or buf.dtype != np.uint8 or buf.ndim != 1:
        got = f"dtype {buf.dtype} shape {buf.shape}" if isinstance(buf, np.ndarray) else type(buf).__name__
        raise TypeError(f"expected a 1-D uint8 buffer, got {got}")
    data = np.ascontiguousarray(buf)
    kind = _KIND_BY_TAG[tag]
    if data.size == 0:
        raise ValueError(f"expected a {kind} buffer, got an empty buffer")
    if data[0] != tag:
        found = _KIND_BY_TAG.get(int(data[0]), "unknown kind")
        raise ValueError(f"expected a {kind} buffer, got tag {int(data[0]):#04x} ({found})")
    if data.size < header.size:
        raise ValueError(f"truncated {kind} buffer: header needs {header.size} bytes, got {data.size}")
    return data, header.unpack_from(data)


def _expect_size(data: np.ndarray, expected: int, kind: str) -> None:
    if data.size < expected:
        raise ValueError(f"truncated {kind} buffer: expected {expected} bytes, got {data.size}")
    if data.size > expected:
        raise ValueError(f"{kind} buffer has {data.size - expected} trailing bytes after {expected}")


def _take(data: np.ndarray, offset: int, nbytes: int, kind: str, what: str) -> np.ndarray:
    """A zero-copy slice, or a truncation error naming the field that did not fit."""
    if offset + nbytes > data.size:
        raise ValueError(
            f"truncated {kind} buffer: {what} needs bytes [{offset}, {offset + nbytes}), "
            f"buffer has {data.size}"
        )
    return data[offset : offset + nbytes]


def _check_dtype_code(code: int, kind: str) -> None:
    if code not in QUANTIZER_CODES:
        raise ValueError(f"{kind} buffer has unknown value dtype code {code}")


def _bitmap_nbytes(n: int) -> int:
    return -(-n // 8)


# --------------------------------------------------------------------------- value payloads


def _payload_nbytes(m: int, code: int) -> int:
    """Bytes of the value payload for m values written by quantiser ``code``."""
    return QUANTIZER_CODES[code].payload_nbytes(m)


def _value_payload(values: np.ndarray, code: int) -> np.ndarray:
    return QUANTIZER_CODES[code].encode(values)


def _decode_payload(payload: np.ndarray, m: int, code: int) -> np.ndarray:
    """float32 values from an exact-length payload slice (fresh array, input untouched)."""
    return QUANTIZER_CODES[code].decode(payload, m)


# --------------------------------------------------------------------------- dense values


def encode_values(values: np.ndarray, dtype: str = "float32") -> np.ndarray:
    """A dense float vector as ``6 + payload`` bytes (see the module docstring)."""
    code = _dtype_code(dtype)
    vec = _float32_vector(values, "values")
    return _join(_VALUES_HEADER.pack(_TAG_VALUES, code, vec.size), _value_payload(vec, code))


def decode_values(buf: np.ndarray) -> np.ndarray:
    """float32 vector from a values buffer."""
    data, (_, code, n) = _open(buf, _TAG_VALUES, _VALUES_HEADER)
    _check_dtype_code(code, "values")
    _expect_size(data, _VALUES_HEADER.size + _payload_nbytes(n, code), "values")
    return _decode_payload(data[_VALUES_HEADER.size :], n, code)


def value_dtype(buf: np.ndarray) -> str:
    """The quantiser name written in a values or sparse buffer's header (nothing else is read)."""
    if not isinstance(buf, np.ndarray) or buf.dtype != np.uint8 or buf.ndim != 1 or buf.size < 3:
        raise ValueError("expected a values or sparse buffer of at least 3 bytes")
    tag = int(buf[0])
    if tag == _TAG_VALUES:
        code = int(buf[1])
    elif tag == _TAG_SPARSE:
        code = int(buf[2])
    else:
        found = _KIND_BY_TAG.get(tag, "unknown kind")
        raise ValueError(f"expected a values or sparse buffer, got tag {tag:#04x} ({found})")
    _check_dtype_code(code, _KIND_BY_TAG[tag])
    return QUANTIZER_CODES[code].name


# --------------------------------------------------------------------------- mask


def encode_mask(mask: np.ndarray) -> np.ndarray:
    """A bool vector as a bitmap: ``5 + ceil(n/8)`` bytes."""
    vec = _bool_vector(mask, "mask")
    return _join(_MASK_HEADER.pack(_TAG_MASK, vec.size), np.packbits(vec))


def decode_mask(buf: np.ndarray) -> np.ndarray:
    """bool vector from a mask buffer."""
    data, (_, n) = _open(buf, _TAG_MASK, _MASK_HEADER)
    _expect_size(data, _MASK_HEADER.size + _bitmap_nbytes(n), "mask")
    return np.unpackbits(data[_MASK_HEADER.size :], count=n).astype(bool)


# --------------------------------------------------------------------------- sparse


def _sparse_nbytes(n: int, k: int, code: int) -> int:
    return _SPARSE_HEADER.size + min(4 * k, _bitmap_nbytes(n)) + _payload_nbytes(k, code)


def encode_sparse(
    indices: np.ndarray, values: np.ndarray, n: int, dtype: str = "float32"
) -> np.ndarray:
    """A length-n sparse vector: ``11 + min(4k, ceil(n/8)) + payload(k)`` bytes.

    Positions travel as uint32 indices when that is smaller than a bitmap, else as the
    bitmap. Unsorted indices are sorted (values permuted with them); duplicate or
    out-of-range indices are an error.
    """
    code = _dtype_code(dtype)
    n = _count(n, "n")
    idx = np.asarray(indices)
    if idx.size == 0:
        idx = idx.astype(np.int64)
    if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
        raise TypeError(f"indices must be a 1-D integer vector, got dtype {idx.dtype} shape {idx.shape}")
    vals = _float32_vector(values, "values")
    if vals.size != idx.size:
        raise ValueError(f"indices and values differ in length: {idx.size} vs {vals.size}")
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise ValueError(f"indices must lie in [0, {n}), got range [{idx.min()}, {idx.max()}]")
    if np.any(np.diff(idx) <= 0):
        order = np.argsort(idx, kind="stable")
        idx, vals = idx[order], vals[order]
        repeated = idx[1:][np.diff(idx) == 0]
        if repeated.size:
            raise ValueError(f"indices must be unique; repeated: {np.unique(repeated)[:10].tolist()}")
    k = idx.size
    if 4 * k < _bitmap_nbytes(n):
        flag, positions = _POSITIONS_INDICES, idx.astype("<u4")
    else:
        bits = np.zeros(n, dtype=bool)
        bits[idx] = True
        flag, positions = _POSITIONS_BITMAP, np.packbits(bits)
    header = _SPARSE_HEADER.pack(_TAG_SPARSE, flag, code, n, k)
    return _join(header, positions, _value_payload(vals, code))


def decode_sparse(buf: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """(indices int64 sorted, values float32, n) from a sparse buffer."""
    data, (_, flag, code, n, k) = _open(buf, _TAG_SPARSE, _SPARSE_HEADER)
    _check_dtype_code(code, "sparse")
    if flag == _POSITIONS_INDICES:
        positions_nbytes = 4 * k
    elif flag == _POSITIONS_BITMAP:
        positions_nbytes = _bitmap_nbytes(n)
    else:
        raise ValueError(f"sparse buffer has unknown positions flag {flag}")
    start = _SPARSE_HEADER.size
    _expect_size(data, start + positions_nbytes + _payload_nbytes(k, code), "sparse")
    positions = data[start : start + positions_nbytes]
    if flag == _POSITIONS_INDICES:
        idx = positions.view("<u4").astype(np.int64)
        if np.any(np.diff(idx) <= 0) or (k and idx[-1] >= n):
            raise ValueError(f"sparse buffer indices are not strictly increasing within [0, {n})")
    else:
        idx = np.flatnonzero(np.unpackbits(positions, count=n))
        if idx.size != k:
            raise ValueError(f"sparse buffer bitmap has {idx.size} bits set, header says k={k}")
    values = _decode_payload(data[start + positions_nbytes :], k, code)
    return idx, values, n


def densify(indices: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
    """Dense float32 vector of length n with ``values`` at ``indices``, zeros elsewhere."""
    out = np.zeros(_count(n, "n"), dtype=np.float32)
    out[indices] = values
    return out


# --------------------------------------------------------------------------- framing


def _frame(tag: int, parts: Mapping[str, np.ndarray]) -> np.ndarray:
    kind = _KIND_BY_TAG[tag]
    if len(parts) > _MAX_PARTS:
        raise ValueError(f"a {kind} buffer holds at most {_MAX_PARTS} parts, got {len(parts)}")
    chunks = [np.frombuffer(_FRAME_HEADER.pack(tag, len(parts)), dtype=np.uint8)]
    for name, payload in parts.items():
        if not isinstance(name, str) or not name.isascii() or not 1 <= len(name) <= 255:
            raise ValueError(f"{kind} part names must be ASCII strings of 1-255 chars, got {name!r}")
        if not isinstance(payload, np.ndarray) or payload.dtype != np.uint8 or payload.ndim != 1:
            raise TypeError(f"{kind} part {name!r} must be a 1-D uint8 array")
        prefix = bytes([len(name)]) + name.encode("ascii") + _PART_LENGTH.pack(payload.size)
        chunks += [np.frombuffer(prefix, dtype=np.uint8), payload]
    return np.concatenate(chunks)


def _unframe(buf: np.ndarray, tag: int) -> dict[str, np.ndarray]:
    data, (_, count) = _open(buf, tag, _FRAME_HEADER)
    kind = _KIND_BY_TAG[tag]
    parts: dict[str, np.ndarray] = {}
    offset = _FRAME_HEADER.size
    for part in range(count):
        name_len = int(_take(data, offset, 1, kind, f"name length of part {part}")[0])
        name = _take(data, offset + 1, name_len, kind, f"name of part {part}").tobytes().decode("ascii")
        offset += 1 + name_len
        length_field = _take(data, offset, _PART_LENGTH.size, kind, f"length of part {name!r}")
        (length,) = _PART_LENGTH.unpack_from(length_field)
        offset += _PART_LENGTH.size
        if name in parts:
            raise ValueError(f"{kind} buffer repeats part {name!r}")
        parts[name] = _take(data, offset, length, kind, f"payload of part {name!r}")
        offset += length
    _expect_size(data, offset, kind)
    return parts


def encode_message(parts: Mapping[str, np.ndarray]) -> np.ndarray:
    """Frame named uint8 parts into one buffer: ``2 + Σ(5 + len(name) + len(part))`` bytes."""
    return _frame(_TAG_MESSAGE, parts)


def message_nbytes(part_nbytes: Mapping[str, int]) -> int:
    """Bytes :func:`encode_message` makes of parts of these names and sizes (bytes), without encoding."""
    return _FRAME_HEADER.size + sum(1 + len(name) + _PART_LENGTH.size + size for name, size in part_nbytes.items())


def values_nbytes(n: int, dtype: str = "float32") -> int:
    """Bytes of :func:`encode_values` of ``n`` values."""
    return _VALUES_HEADER.size + _payload_nbytes(n, _dtype_code(dtype))


def decode_message(buf: np.ndarray) -> dict[str, np.ndarray]:
    """Named parts as zero-copy views into ``buf`` (read-only if ``buf`` is)."""
    return _unframe(buf, _TAG_MESSAGE)


def encode_scalars(**values: float | int) -> np.ndarray:
    """Per-message metadata (sample counts, losses) as float64s, so those bytes are counted too.

    Each value costs ``13 + len(name)`` bytes; ints round-trip exactly up to 2**53.
    """
    payloads = {}
    for name, value in values.items():
        payloads[name] = np.array([_real(value, f"scalar {name!r}")], dtype="<f8").view(np.uint8)
    return _frame(_TAG_SCALARS, payloads)


def decode_scalars(buf: np.ndarray) -> dict[str, float]:
    """Names and float values from a scalars buffer."""
    scalars = {}
    for name, payload in _unframe(buf, _TAG_SCALARS).items():
        if payload.size != 8:
            raise ValueError(f"scalars buffer: value {name!r} has {payload.size} bytes, expected 8")
        scalars[name] = float(payload.view("<f8")[0])
    return scalars


# --------------------------------------------------------------------------- downlink


def encode_downlink(
    params: np.ndarray,
    *,
    changed: np.ndarray | None,
    mask: np.ndarray | None,
    dtype: str = "float32",
) -> np.ndarray:
    """What a client holding some model version needs (SPEC §3), in the fewest bytes.

    ``changed`` marks the scalars that differ from the client's version (None: the client
    holds nothing). The ``"params"`` part is a sparse delta of those scalars when that is
    strictly smaller than the full values buffer, else the full model; the buffer's tag says
    which. A ``"mask"`` bitmap part is added when ``mask`` is given (the client's is stale).
    """
    code = _dtype_code(dtype)
    vec = _float32_vector(params, "params")
    n = vec.size
    body = None
    if changed is not None:
        idx = np.flatnonzero(_bool_vector(changed, "changed", n))
        if _delta_is_smaller(n, idx.size, code):
            body = encode_sparse(idx, vec[idx], n, dtype)
    parts = {_DOWNLINK_PARAMS: encode_values(vec, dtype) if body is None else body}
    if mask is not None:
        parts[_DOWNLINK_MASK] = encode_mask(_bool_vector(mask, "mask", n))
    return encode_message(parts)


def _delta_is_smaller(n: int, k: int, code: int) -> bool:
    """The downlink rule: send k changed of n values as a sparse delta iff strictly smaller."""
    return _sparse_nbytes(n, k, code) < _VALUES_HEADER.size + _payload_nbytes(n, code)


def downlink_part_nbytes(n: int, changed: int | None, mask: bool, dtype: str = "float32") -> dict[str, int]:
    """The parts of :func:`encode_downlink` and their sizes in bytes, from counts alone.

    ``changed`` is how many of the ``n`` scalars changed since the client's version (None: it
    holds nothing); ``mask``: the mask part is sent. Equal to the encoded buffer's parts for
    every input (tested), so download accounting costs O(1) per client instead of an O(n)
    encoding per distinct version held.
    """
    code = _dtype_code(dtype)
    sparse = changed is not None and _delta_is_smaller(n, changed, code)
    parts = {_DOWNLINK_PARAMS: _sparse_nbytes(n, changed, code) if sparse else values_nbytes(n, dtype)}
    if mask:
        parts[_DOWNLINK_MASK] = _MASK_HEADER.size + _bitmap_nbytes(n)
    return parts


def decode_downlink(
    buf: np.ndarray, cached_params: np.ndarray | None, cached_mask: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray | None]:
    """(new params, new mask or ``cached_mask``); ``cached_params`` is never modified."""
    parts = decode_message(buf)
    unexpected = set(parts) - {_DOWNLINK_PARAMS, _DOWNLINK_MASK}
    if _DOWNLINK_PARAMS not in parts or unexpected:
        raise ValueError(
            f"downlink must hold a {_DOWNLINK_PARAMS!r} part and optionally {_DOWNLINK_MASK!r}, "
            f"got {sorted(parts)}"
        )
    body = parts[_DOWNLINK_PARAMS]
    if body.size and body[0] == _TAG_SPARSE:
        if cached_params is None:
            raise ValueError("downlink carries a delta but the client holds no cached_params")
        idx, values, n = decode_sparse(body)
        params = _same_length(cached_params, "cached_params", n).copy()
        params[idx] = values
    else:
        params = decode_values(body)
    mask = decode_mask(parts[_DOWNLINK_MASK]) if _DOWNLINK_MASK in parts else cached_mask
    return params, mask
