"""The APF controller: per-scalar stability checks and freezing periods (SPEC §2).

It runs on the server, on the aggregated global vector, so there is exactly one mask.
Time is counted in *checks* (one every ``check_every`` aggregation rounds); freezing
periods are numbers of checks.

State per scalar j, 16 bytes in all:

* ``ref``, ``E``, ``A``: float32 (12 B) — value at the previous check and the two EMAs.
* ``L``: uint16 (2 B) — freezing period in checks, saturating at :data:`MAX_PERIOD`.
* ``R``: uint16 (2 B) — checks left until j is active again, i.e. ``U − k`` of the spec.
  The mask is derived, never stored: ``active == (R == 0)``. A permanently frozen
  scalar holds the sentinel :data:`FOREVER` and never counts down.

A check walks the vector in blocks of :data:`BLOCK` scalars, so its temporaries stay
small and cache-resident whatever n is; the only n-sized allocation is the returned mask.
Within a block every "only where judged" update is branch-free arithmetic with the 0/1
mask (``x += judged · (new − x)``): numpy's ``where=`` loops and ``np.where`` are 10–40×
slower on the irregular masks APF produces.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any

import numpy as np
import numpy.typing as npt

MAX_PERIOD = 2**15
"""Largest freezing period in checks; longer periods saturate here (far beyond any run)."""

FOREVER = np.uint16(np.iinfo(np.uint16).max)
"""``R`` sentinel of the ``permanent`` strawman: frozen for good, never thawed."""

BLOCK = 2**16
"""Scalars per block of a check (about 1 MiB of temporaries)."""

_FIXED_RE = re.compile(r"fixed:(\d+)")
_ARRAY_STATE = {
    "ref": np.float32,
    "ema": np.float32,
    "abs_ema": np.float32,
    "period": np.uint16,
    "remaining": np.uint16,
}
_SCALAR_STATE = ("num_updates", "num_checks", "threshold", "rng_state")
_RNG_WORDS = 6  # PCG64: state (128 bit), inc (128 bit), has_uint32, uinteger


def _select(dst: np.ndarray, cond: np.ndarray, value: np.ndarray) -> None:
    """``dst[cond] = value[cond]`` in place, branch-free; ``value`` is used as scratch.

    For unsigned integers ``dst + cond·(value − dst)`` is exact thanks to wrap-around.
    """
    np.subtract(value, dst, out=value)
    np.multiply(value, cond, out=value)
    np.add(dst, value, out=dst)


@dataclass(frozen=True)
class PeriodPolicy:
    """How the freezing period L reacts to a stable / unstable verdict (paper Fig. 12)."""

    kind: str
    fixed_period: int = 0

    @classmethod
    def parse(cls, spec: str) -> PeriodPolicy:
        if spec in ("aimd", "additive", "multiplicative", "permanent"):
            return cls(spec)
        match = _FIXED_RE.fullmatch(spec) if isinstance(spec, str) else None
        if match is None:
            raise ValueError(
                "period_policy must be one of 'aimd', 'additive', 'multiplicative', "
                f"'permanent' or 'fixed:N', got {spec!r}"
            )
        period = int(match.group(1))
        if not 1 <= period <= MAX_PERIOD:
            raise ValueError(
                f"period_policy 'fixed:N' needs N in [1, {MAX_PERIOD}] checks, got {spec!r}"
            )
        return cls("fixed", period)

    @property
    def freezes_for_good(self) -> bool:
        return self.kind == "permanent"

    def stable_period(self, period: np.ndarray) -> np.ndarray | None:
        """New L of a stable scalar (None: L unused, ``permanent`` freezes for good)."""
        if self.kind in ("aimd", "additive"):
            return period + (period < MAX_PERIOD)
        if self.kind == "multiplicative":
            return np.maximum(np.minimum(period, MAX_PERIOD // 2) << 1, 1)
        if self.kind == "fixed":
            return np.full_like(period, self.fixed_period)
        return None

    def unstable_period(self, period: np.ndarray) -> np.ndarray | None:
        """New L of an unstable scalar (None: unchanged)."""
        if self.kind in ("aimd", "multiplicative"):
            return period >> 1
        if self.kind == "additive":
            return period - (period > 0)
        if self.kind == "fixed":
            return np.zeros_like(period)
        return None


def _check_range(name: str, value: Any, low: float, high: float, *, low_open: bool,
                 high_open: bool) -> float:
    """Return ``value`` as float if it lies in the interval, else a ValueError naming it."""
    ok = isinstance(value, Real) and not isinstance(value, bool) and np.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (
            value < high if high_open else value <= high
        )
    if not ok:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be a number in {interval}, got {value!r}")
    return float(value)


def _as_flat_float32(name: str, params: npt.ArrayLike) -> np.ndarray:
    """View (or, for other dtypes, copy) ``params`` as a finite 1-D float32 vector."""
    vector = np.asarray(params, dtype=np.float32)
    if vector.ndim != 1:
        raise ValueError(f"{name} must be a flat 1-D vector, got shape {vector.shape}")
    # A float32 sum is finite only if every element is (inf and nan propagate); only when
    # it overflows on large finite values is the exact, n-byte-temporary check needed.
    with np.errstate(over="ignore"):
        total = vector.sum()
    if not np.isfinite(total) and not np.isfinite(vector).all():
        bad = int(np.flatnonzero(~np.isfinite(vector))[0])
        raise ValueError(f"{name} must be finite, got {vector[bad]} at index {bad}")
    return vector


class APFController:
    """Decides, after every aggregation round, which scalars are synchronised next round.

    ``update(w)`` is called once per round with the new global vector and returns the
    boolean mask (True = active: trained and sent) for the next round. Stability checks
    run on every ``check_every``-th call; see SPEC §2 for the exact semantics.
    """

    def __init__(
        self,
        initial_params: npt.ArrayLike,
        *,
        alpha: float = 0.99,
        threshold: float = 0.05,
        tighten_ratio: float = 0.8,
        threshold_min: float = 1e-4,
        check_every: int = 1,
        aggressive_prob: float = 0.0,
        period_policy: str = "aimd",
        seed: int = 0,
    ) -> None:
        self.alpha = _check_range("alpha", alpha, 0.0, 1.0, low_open=False, high_open=True)
        self._threshold = _check_range(
            "threshold", threshold, 0.0, np.inf, low_open=True, high_open=True
        )
        self.threshold_min = _check_range(
            "threshold_min", threshold_min, 0.0, self._threshold, low_open=True, high_open=False
        )
        self.tighten_ratio = _check_range(
            "tighten_ratio", tighten_ratio, 0.0, 1.0, low_open=True, high_open=False
        )
        self.aggressive_prob = _check_range(
            "aggressive_prob", aggressive_prob, 0.0, 1.0, low_open=False, high_open=False
        )
        if not isinstance(check_every, Integral) or isinstance(check_every, bool) or check_every < 1:
            raise ValueError(f"check_every must be an integer >= 1 (rounds), got {check_every!r}")
        self.check_every = int(check_every)
        if not isinstance(seed, Integral) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.period_policy = period_policy
        self._policy = PeriodPolicy.parse(period_policy)

        ref = _as_flat_float32("initial_params", initial_params)
        if ref.size == 0:
            raise ValueError("initial_params must hold at least one parameter, got an empty vector")
        n = ref.size
        self._ref = ref.copy()  # never alias the caller's (possibly read-only) buffer
        self._ema = np.zeros(n, dtype=np.float32)
        self._abs_ema = np.zeros(n, dtype=np.float32)
        self._period = np.zeros(n, dtype=np.uint16)
        self._remaining = np.zeros(n, dtype=np.uint16)
        self._num_updates = 0
        self._num_checks = 0
        self._num_frozen = 0
        self._rng = np.random.Generator(np.random.PCG64(seed))

    # ------------------------------------------------------------------ read-only views
    @property
    def num_params(self) -> int:
        return self._ref.size

    @property
    def threshold(self) -> float:
        """Current stability threshold T (halved by tightening, never below threshold_min)."""
        return self._threshold

    def set_threshold(self, threshold: float) -> None:
        """Replace the current T (a search changing it mid-run, e.g. a PBT exploit)."""
        self._threshold = _check_range("threshold", threshold, 0.0, np.inf, low_open=True, high_open=True)
        if self.threshold_min > self._threshold:
            raise ValueError(f"threshold {threshold} is below threshold_min {self.threshold_min}")

    @property
    def num_checks(self) -> int:
        """Index k of the last stability check (0 before the first)."""
        return self._num_checks

    @property
    def active(self) -> np.ndarray:
        """Fresh boolean mask, True = active in the next round (derived from R == 0)."""
        return self._remaining == 0

    @property
    def frozen_fraction(self) -> float:
        """Fraction of scalars frozen for the next round, as of the last check."""
        return self._num_frozen / self.num_params

    def state_at(self, index: npt.ArrayLike) -> dict[str, np.ndarray]:
        """``ref``, ``ema``, ``abs_ema``, ``period`` and ``remaining`` at ``index`` only (copies).

        A probe that follows a sample of scalars every round reads them here, without the
        16 bytes × n copy of :meth:`state_dict`.
        """
        return {key: getattr(self, f"_{key}")[index] for key in _ARRAY_STATE}

    @property
    def state_nbytes(self) -> int:
        """Bytes of all state that scales with n (16 per parameter)."""
        return sum(getattr(self, f"_{key}").nbytes for key in _ARRAY_STATE)

    # ------------------------------------------------------------------ the algorithm
    def update(self, global_params: npt.ArrayLike) -> np.ndarray:
        """Feed the global vector after one aggregation round; return the next round's mask.

        The returned array is a fresh copy owned by the caller (True = active).
        """
        w = _as_flat_float32("global_params", global_params)
        if w.size != self.num_params:
            raise ValueError(
                f"global_params has {w.size} parameters, the controller tracks {self.num_params}"
            )
        self._num_updates += 1
        if self._num_updates % self.check_every:
            return self.active
        return self._check(w)

    def _check(self, w: np.ndarray) -> np.ndarray:
        self._num_checks += 1
        mask = np.empty(self.num_params, dtype=bool)
        for start in range(0, self.num_params, BLOCK):
            self._check_block(w, slice(start, start + BLOCK), mask)
        self._num_frozen = self.num_params - int(np.count_nonzero(mask))
        if self.frozen_fraction >= self.tighten_ratio:
            self._threshold = max(self._threshold / 2.0, self.threshold_min)
        return mask

    def _check_block(self, w: np.ndarray, block: slice, mask: np.ndarray) -> None:
        """Run check k on one block of scalars, writing its part of the new mask."""
        w, ref, ema, abs_ema, period, remaining = (
            array[block]
            for array in (w, self._ref, self._ema, self._abs_ema, self._period, self._remaining)
        )
        judged = remaining == 0  # active during the interval
        # Frozen ones keep U, so R = U − k drops by one; R − 1 wraps 0 to 65535, which
        # leaves both R == 0 and R == FOREVER alone.
        remaining -= (remaining - 1) < FOREVER - 1

        one_minus_alpha = np.float32(1.0 - self.alpha)
        delta = w - ref  # Δ accumulated over the interval
        step = delta - ema  # E ← α·E + (1−α)·Δ  ==  E + (1−α)·(Δ − E)
        step *= one_minus_alpha
        step *= judged
        ema += step
        np.abs(delta, out=delta)
        np.subtract(delta, abs_ema, out=step)  # A ← A + (1−α)·(|Δ| − A)
        step *= one_minus_alpha
        step *= judged
        abs_ema += step

        perturbation = np.abs(ema, out=delta)
        with np.errstate(invalid="ignore", divide="ignore"):
            np.divide(perturbation, abs_ema, out=perturbation)  # P; NaN where A == 0
        # "not (P >= T)" rather than "P < T", so that the A == 0 NaN counts as stable.
        unstable = perturbation >= self._threshold
        unstable &= judged
        stable = np.logical_xor(judged, unstable, out=judged)

        new_period = self._policy.stable_period(period)
        if new_period is not None:
            _select(period, stable, new_period)
        new_period = self._policy.unstable_period(period)
        if new_period is not None:
            _select(period, unstable, new_period)
        if self.aggressive_prob > 0.0:
            self._freeze_aggressively(period, unstable)

        # Judged scalars have R = 0, so adding sets U ← k + L.
        remaining += period * unstable
        remaining += (stable * FOREVER) if self._policy.freezes_for_good else (period * stable)
        np.copyto(ref, w)
        np.equal(remaining, 0, out=mask[block])

    def _freeze_aggressively(self, period: np.ndarray, unstable: np.ndarray) -> None:
        """With probability p give an unstable scalar L ← max(L, 1).

        Only scalars whose L is 0 can change, so one uniform draw is spent per such scalar,
        in flat order: the draws depend only on the seed and the sequence of updates.
        """
        candidates = unstable & (period == 0)
        count = int(np.count_nonzero(candidates))
        if count:
            candidates[candidates] = self._rng.random(count, dtype=np.float32) < self.aggressive_prob
            period += candidates

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """Everything that evolves (RNG included) as numpy arrays / scalars.

        The arrays are the controller's own, not copies (as ``ServerCore.state_dict``): the next
        :meth:`update` changes them in place. Hyperparameters are not included: they come from
        the constructor, so a resumed run is built from the same config. The dict survives
        ``np.savez`` / ``np.load``.
        """
        rng = self._rng.bit_generator.state
        mask64 = (1 << 64) - 1
        words = [
            rng["state"]["state"] >> 64, rng["state"]["state"] & mask64,
            rng["state"]["inc"] >> 64, rng["state"]["inc"] & mask64,
            rng["has_uint32"], rng["uinteger"],
        ]
        state: dict[str, Any] = {key: getattr(self, f"_{key}") for key in _ARRAY_STATE}
        state.update(
            num_updates=self._num_updates,
            num_checks=self._num_checks,
            threshold=self._threshold,
            rng_state=np.array(words, dtype=np.uint64),
        )
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` taken from a controller over the same n parameters."""
        expected = set(_ARRAY_STATE) | set(_SCALAR_STATE)
        if set(state) != expected:
            missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
            raise ValueError(f"APF controller state: missing keys {missing}, unexpected keys {extra}")
        for key, dtype in _ARRAY_STATE.items():
            value = np.asarray(state[key])
            if value.shape != (self.num_params,) or value.dtype != dtype:
                raise ValueError(
                    f"APF controller state[{key!r}] must be {np.dtype(dtype)} of shape "
                    f"({self.num_params},), got {value.dtype} of shape {value.shape}"
                )
        words = np.asarray(state["rng_state"])
        if words.shape != (_RNG_WORDS,) or words.dtype != np.uint64:
            raise ValueError(
                f"APF controller state['rng_state'] must be uint64 of shape ({_RNG_WORDS},), "
                f"got {words.dtype} of shape {words.shape}"
            )
        threshold = _check_range(
            "state['threshold']", float(state["threshold"]), 0.0, np.inf,
            low_open=True, high_open=True,
        )
        for key in _ARRAY_STATE:
            np.copyto(getattr(self, f"_{key}"), state[key])
        self._num_updates = int(state["num_updates"])
        self._num_checks = int(state["num_checks"])
        self._threshold = threshold
        self._num_frozen = int(np.count_nonzero(self._remaining))
        hi_state, lo_state, hi_inc, lo_inc, has_uint32, uinteger = (int(x) for x in words)
        self._rng.bit_generator.state = {
            "bit_generator": "PCG64",
            "state": {"state": (hi_state << 64) | lo_state, "inc": (hi_inc << 64) | lo_inc},
            "has_uint32": has_uint32,
            "uinteger": uinteger,
        }
