"""The uplink chain: select → sparsify → quantise → frame (Plato's processor pipeline, for FL bytes).

``strategy.uplink`` lists at most one sparsifier and at most one quantiser, in that order,
e.g. ``[{name: topk, ratio: 0.1}, int8]``; the strategy decides which scalars are
synchronised at all (APF's active ones). So APF ∘ Top-k ∘ int8 is configuration::

    strategy: {name: apf, uplink: [{name: topk, ratio: 0.1}, int8]}

Without a sparsifier the synchronised values travel densely in flat order with no indices
(the mask is shared); with one, as a sparse vector over the synchronised positions. A
sparsifier keeps an error-feedback residual per client (what it did not send, and what
quantisation lost), held in the client's strategy state.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Sequence
from typing import Any

import numpy as np
from pydantic import BaseModel, ValidationError

from apf_ray import wire
from apf_ray.compression import Quantizer, Sparsifier, UplinkStage, stage_class, stage_spec
from apf_ray.compression.quantize import Float32
from apf_ray.errors import did_you_mean
from apf_ray.masks import mask_index

RESIDUAL = "residual"
"""Key of the error-feedback residual (float32, one per scalar) in a client's strategy state."""


class OptionsError(ValueError):
    """Options that fail their pydantic model; ``errors`` keep pydantic's (location, message, input)."""

    def __init__(self, errors: list[tuple[tuple, str, Any]]) -> None:
        self.errors = errors
        super().__init__("; ".join(f"{'.'.join(map(str, loc))}: {msg}" for loc, msg, _ in errors))


def known_keys(model: type, loc: Sequence[Any]) -> list[str]:
    """The field names of the pydantic model found at ``loc`` inside ``model`` (list indices and
    dict keys skipped), for a did-you-mean; empty if ``loc`` leads to no model."""
    for part in loc:
        if isinstance(part, int) or not (isinstance(model, type) and issubclass(model, BaseModel)):
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            return []
        model = _inner_model(field.annotation)
    return list(model.model_fields) if isinstance(model, type) and issubclass(model, BaseModel) else []


def _inner_model(annotation: Any) -> Any:
    """The pydantic model inside an annotation such as ``list[PoolConfig]`` or ``X | None`` (else it)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation) if typing.get_origin(annotation) not in (None, types.NoneType) else ():
        inner = _inner_model(arg)
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            return inner
    return annotation


def validate_options(model: type, options: dict[str, Any], prefix: tuple = ()) -> Any:
    """``model.model_validate(options)``, failures as :class:`OptionsError` with located errors
    (an unknown key with the closest known one)."""
    try:
        return model.model_validate(options)
    except ValidationError as err:
        errors = []
        for e in err.errors():
            if e["type"] == "extra_forbidden":
                msg, value = "unknown key" + did_you_mean(e["loc"][-1], known_keys(model, e["loc"][:-1])), None
            else:
                msg, value = e["msg"].removeprefix("Value error, "), e.get("input")
            errors.append(((*prefix, *e["loc"]), msg, value))
        raise OptionsError(errors) from None


def build_stages(spec: Sequence[Any]) -> list[UplinkStage]:
    """Instantiate ``strategy.uplink`` items; errors are :class:`OptionsError` located by index."""
    stages: list[UplinkStage] = []
    for i, item in enumerate(spec):
        try:
            name, options = stage_spec(item)
            cls = stage_class(name)
        except ValueError as err:
            raise OptionsError([((i,), str(err), item)]) from None
        stages.append(cls(validate_options(cls.Options, options, (i,))))
    kinds = [s.kind for s in stages]
    if kinds.count("sparsify") > 1 or kinds.count("quantize") > 1 or kinds == ["quantize", "sparsify"]:
        raise OptionsError([((), "at most one sparsifier then at most one quantiser, e.g. "
                                 f"[topk, int8]; got {[s.name for s in stages]}", list(spec))])
    return stages


class UplinkChain:
    """Encodes a client's update over the synchronised scalars, and decodes it on the server."""

    def __init__(self, stages: Sequence[UplinkStage] = ()) -> None:
        self.sparsifier: Sparsifier | None = next((s for s in stages if isinstance(s, Sparsifier)), None)
        self.quantizer: type[Quantizer] = next(
            (type(s) for s in stages if isinstance(s, Quantizer)), Float32)

    @classmethod
    def from_spec(cls, spec: Sequence[Any]) -> UplinkChain:
        return cls(build_stages(spec))

    @property
    def sparse(self) -> bool:
        """Whether uploads are sparse vectors (a sparsifier is in the chain)."""
        return self.sparsifier is not None

    def encode(self, update: np.ndarray, sync_mask: np.ndarray | None, weights: np.ndarray,
               round_index: int, state: dict[str, Any]) -> np.ndarray:
        """The ``values`` part of an upload for ``update`` (float32, one per scalar).

        ``weights`` are the global values (Gaia's reference); ``state`` is the client's
        strategy state, whose residual is read and replaced.
        """
        index = None if sync_mask is None else mask_index(sync_mask)
        synced = update if index is None else update[index]
        dtype = self.quantizer.name
        if self.sparsifier is None:
            return wire.encode_values(synced, dtype)
        residual = state.get(RESIDUAL)
        corrected = synced.astype(np.float32, copy=True)
        if residual is not None:
            corrected += residual if index is None else residual[index]
        if not np.all(np.isfinite(corrected)):
            raise ValueError("update + residual contains NaN or inf; refusing to compress it")
        positions = self.sparsifier.select(corrected, weights if index is None else weights[index],
                                           round_index)
        buf = wire.encode_sparse(positions, corrected[positions], corrected.size, dtype)
        _, sent, _ = wire.decode_sparse(buf)
        corrected[positions] -= sent  # what the receiver did not get stays for later rounds
        if index is None:
            state[RESIDUAL] = corrected
        else:
            full = np.zeros(update.size, np.float32) if residual is None else residual.copy()
            full[index] = corrected
            state[RESIDUAL] = full
        return buf

    def decode(self, values_part: np.ndarray, num_synced: int) -> np.ndarray:
        """The update over the round's ``num_synced`` synchronised scalars, in flat order (float32,
        0 where a sparsifier sent nothing), from an upload's ``values`` part.

        The container must be the kind (dense or sparse) and the value type this chain
        produces, and cover exactly the synchronised scalars; anything else is a ValueError
        naming the mismatch. The result stays compact: scattering it into a model-sized vector
        (one boolean-mask pass, ~15 copies of the model's time when half of it is frozen) is
        left to whoever needs it, once per round (:meth:`Strategy.aggregate`).
        """
        kind = "sparse" if self.sparse else "dense"
        dtype = wire.value_dtype(values_part)
        if dtype != self.quantizer.name:
            raise ValueError(f"upload values are {dtype}, the uplink chain sends {self.quantizer.name}")
        if self.sparse:
            positions, values, n = wire.decode_sparse(values_part)
            if n != num_synced:
                raise ValueError(f"sparse upload covers {n} scalars, the round synchronises {num_synced}")
            return wire.densify(positions, values, n)
        synced = wire.decode_values(values_part)
        if synced.size != num_synced:
            raise ValueError(f"{kind} upload has {synced.size} values, the round synchronises {num_synced}")
        return synced
