"""Injected faults: clients that fail, and clients that send hostile uploads, on purpose.

Chaos testing for the server's defences (``faults`` in the config). Each decision is drawn
from a stream seeded by (seed, round, client), so a faulty run is as reproducible as a clean
one and the same clients misbehave on Ray and in-process. A corrupted upload is an honest
one rewritten on the wire, so it exercises exactly what a malicious client could send:

=========  ================================================================================
kind       what the upload carries
=========  ================================================================================
nan        ~1% of the sent values (at least one) set to NaN
inf        ~1% of the sent values set to ±inf
huge       ~1% of the sent values set to ±1e30 (finite, but overwhelming)
scale      every sent value × ``faults.corrupt_scale`` (1000: a boosted update, as in
           model-replacement attacks; −10: a sign-flipping one within a norm bound)
garbage    random bytes of the same length
samples    a claimed sample count of 1e12 (FedAvg would let it outweigh everyone else)
=========  ================================================================================

Values keep the uplink chain's container and value type where it can hold them (int8
cannot hold NaN or inf: those go as float32, which the server refuses as the wrong type). A
skipped CMFL upload carries no values, so value kinds leave it honest.
"""

from __future__ import annotations

import numpy as np

from apf_ray import wire
from apf_ray.workload import client_seed

KINDS = ("nan", "inf", "huge", "scale", "garbage", "samples")
HUGE = 1e30
CLAIMED_SAMPLES = 1e12
_FAILURE_STREAM, _CORRUPT_STREAM = 1, 2  # offsets added to the seed: independent decisions


def fault_rng(seed: int, stream: int, round_idx: int, client_id: int) -> np.random.Generator:
    """The RNG of one fault decision for (experiment, round, client)."""
    return np.random.default_rng(client_seed(seed + stream, round_idx, client_id))


def client_fails(seed: int, prob: float, round_idx: int, client_id: int) -> bool:
    """Whether ``faults.client_failure_prob`` makes this client raise this round."""
    return bool(prob) and fault_rng(seed, _FAILURE_STREAM, round_idx, client_id).random() < prob


def corrupt_rng(seed: int, prob: float, round_idx: int, client_id: int) -> np.random.Generator | None:
    """The RNG for this client's corruption if ``faults.corrupt_upload_prob`` picks it this round."""
    if not prob:
        return None
    rng = fault_rng(seed, _CORRUPT_STREAM, round_idx, client_id)
    return rng if rng.random() < prob else None


def _corrupt_values(values: np.ndarray, kind: str, rng: np.random.Generator, scale: float) -> np.ndarray:
    out = values.astype(np.float32, copy=True)
    if out.size == 0:
        return out
    if kind == "scale":
        with np.errstate(over="ignore"):  # already huge values may overflow to inf: still hostile
            return out * np.float32(scale)
    hit = rng.choice(out.size, size=max(1, out.size // 100), replace=False)
    signs = np.where(rng.random(hit.size) < 0.5, -1.0, 1.0)
    out[hit] = {"nan": np.nan, "inf": np.inf, "huge": HUGE}[kind] * signs
    return out


def _corrupt_part(part: np.ndarray, kind: str, rng: np.random.Generator, scale: float) -> np.ndarray:
    """A values or sparse container with its values corrupted, re-encoded."""
    dtype = wire.value_dtype(part)
    if part[0] == ord("S"):
        idx, values, n = wire.decode_sparse(part)
        bad = _corrupt_values(values, kind, rng, scale)
        try:
            return wire.encode_sparse(idx, bad, n, dtype)
        except ValueError:
            return wire.encode_sparse(idx, bad, n, "float32")
    bad = _corrupt_values(wire.decode_values(part), kind, rng, scale)
    try:
        return wire.encode_values(bad, dtype)
    except ValueError:
        return wire.encode_values(bad, "float32")


def corrupt_upload(buf: np.ndarray, kind: str, rng: np.random.Generator, scale: float = 1000.0) -> np.ndarray:
    """The hostile version of an honest upload ``buf`` (see the module docstring); ``scale`` for ``scale``."""
    if kind not in KINDS:
        raise ValueError(f"faults.corrupt_kind {kind!r} is not one of {', '.join(KINDS)}")
    if kind == "garbage":
        return rng.integers(0, 256, size=buf.size, dtype=np.uint8)
    parts = dict(wire.decode_message(buf))
    if kind == "samples":
        meta = wire.decode_scalars(parts["meta"])
        meta["num_samples"] = CLAIMED_SAMPLES
        parts["meta"] = wire.encode_scalars(**meta)
    elif "values" in parts:
        parts["values"] = _corrupt_part(parts["values"], kind, rng, scale)
    return wire.encode_message(parts)
