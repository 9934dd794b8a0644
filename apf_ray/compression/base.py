"""The two kinds of uplink processor, and the registry that names them.

An upload is built as a chain (``apf_ray.uplink``): the strategy selects the synchronised
scalars (APF: the active ones), an optional **sparsifier** picks which of those to send
(keeping what it did not send as an error-feedback residual on the client), and a
**quantiser** decides how each sent value is written (float32, float16, bfloat16, int8). The
wire module (``apf_ray.wire``) only frames what they produce. A new compressor is one file
that subclasses :class:`Sparsifier` or :class:`Quantizer` and decorates it with
:func:`register_stage`; users may also name their own by import path in
``strategy.uplink``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

from apf_ray.errors import excerpt
from apf_ray.plugins import resolve, subclass_of


class NoOptions(BaseModel):
    """Options model of a processor that takes none."""

    model_config = ConfigDict(extra="forbid")


class UplinkStage(ABC):
    """One processor of the uplink chain, configured by its own pydantic ``Options``."""

    name: ClassVar[str]
    kind: ClassVar[Literal["sparsify", "quantize"]]
    Options: ClassVar[type[BaseModel]] = NoOptions

    def __init__(self, options: BaseModel | None = None) -> None:
        self.options = options if options is not None else self.Options()


class Sparsifier(UplinkStage):
    """Chooses which synchronised scalars a client sends this round.

    It sees the *corrected* update (this round's update plus the residual of what earlier
    rounds did not send: error feedback), so small updates accumulate until they matter.
    """

    kind = "sparsify"

    @abstractmethod
    def select(self, corrected: np.ndarray, weights: np.ndarray, round_index: int) -> np.ndarray:
        """Sorted int64 positions into ``corrected`` to send.

        ``weights`` are the current global values at the same positions; ``round_index`` is
        0 in the first round.
        """


class Quantizer(UplinkStage):
    """How values are written on the wire: a payload layout with a one-byte ``code``.

    ``encode`` takes finite or non-finite float32 values (a quantiser that cannot represent
    some must raise ValueError) and returns the payload bytes; ``decode`` reads exactly
    ``payload_nbytes(m)`` bytes back into float32. Both directions are pure functions.
    """

    kind = "quantize"
    code: ClassVar[int]

    @staticmethod
    @abstractmethod
    def payload_nbytes(m: int) -> int:
        """Bytes of the payload for ``m`` values."""

    @staticmethod
    @abstractmethod
    def encode(values: np.ndarray) -> np.ndarray:
        """Payload (a 1-D array whose raw bytes go on the wire) for float32 ``values``."""

    @staticmethod
    @abstractmethod
    def decode(payload: np.ndarray, m: int) -> np.ndarray:
        """Fresh float32 values from an exact-length uint8 payload (never written to)."""


UPLINK_STAGES: dict[str, type[UplinkStage]] = {}
QUANTIZER_CODES: dict[int, type[Quantizer]] = {}


def register_stage(cls: type[UplinkStage]) -> type[UplinkStage]:
    """Class decorator: make ``cls`` available in ``strategy.uplink`` under ``cls.name``."""
    if cls.name in UPLINK_STAGES:
        raise ValueError(f"uplink stage {cls.name!r} is registered twice")
    if issubclass(cls, Quantizer):
        if cls.code in QUANTIZER_CODES:
            raise ValueError(f"quantiser {cls.name!r} reuses wire code {cls.code}")
        QUANTIZER_CODES[cls.code] = cls
    UPLINK_STAGES[cls.name] = cls
    return cls


def stage_class(name: str) -> type[UplinkStage]:
    """The registered stage ``name``, or a user's stage by import path."""
    return resolve(name, UPLINK_STAGES, "uplink stage", check=subclass_of(UplinkStage),
                   expected="a Sparsifier or Quantizer subclass")


def quantizer(name: str) -> type[Quantizer]:
    """The quantiser class named ``name`` (for the wire's value containers)."""
    cls = UPLINK_STAGES.get(name)
    if cls is None or not issubclass(cls, Quantizer):
        known = [q.name for _, q in sorted(QUANTIZER_CODES.items())]
        raise ValueError(f"unknown value dtype {name!r}; allowed: {', '.join(known)}")
    return cls


def stage_spec(item: Any) -> tuple[str, dict[str, Any]]:
    """``"int8"`` or ``{"name": "topk", "ratio": 0.1}`` → (name, options)."""
    if isinstance(item, str):
        return item, {}
    if isinstance(item, dict) and isinstance(item.get("name"), str):
        options = dict(item)
        return options.pop("name"), options
    raise ValueError(f"an uplink stage is a name or a mapping with a 'name', got {excerpt(item)}")
