"""Flat float32 views of a model.

The controller, codecs and aggregation all work on one flat vector of the trainable
parameters in ``model.parameters()`` order (SPEC §2). Floating non-trainable buffers
(BatchNorm running statistics) form a second vector that is always synchronised densely.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class FlatLayout:
    """Where each named parameter tensor lives in the flat vector."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    num_params: int
    num_buffer_values: int

    @property
    def slices(self) -> dict[str, slice]:
        out, start = {}, 0
        for name, shape in zip(self.names, self.shapes, strict=True):
            size = int(np.prod(shape, dtype=np.int64))
            out[name] = slice(start, start + size)
            start += size
        return out

    def layer_slices(self) -> dict[str, slice]:
        """Group parameters by module (``features.0.weight`` + ``.bias`` → ``features.0``)."""
        groups: dict[str, slice] = {}
        for name, sl in self.slices.items():
            layer = name.rsplit(".", 1)[0] if "." in name else name
            prev = groups.get(layer)
            groups[layer] = sl if prev is None else slice(prev.start, sl.stop)
        return groups


def _buffers(model: torch.nn.Module) -> list[torch.Tensor]:
    return [b for b in model.buffers() if b.is_floating_point()]


def layout_of(model: torch.nn.Module) -> FlatLayout:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return FlatLayout(
        names=tuple(n for n, _ in named),
        shapes=tuple(tuple(p.shape) for _, p in named),
        num_params=sum(p.numel() for _, p in named),
        num_buffer_values=sum(b.numel() for b in _buffers(model)),
    )


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _gather(tensors: list[torch.Tensor]) -> np.ndarray:
    if not tensors:
        return np.zeros(0, dtype=np.float32)
    with torch.no_grad():
        return torch.cat([t.detach().reshape(-1).to("cpu", torch.float32) for t in tensors]).numpy().copy()


def _scatter(tensors: list[torch.Tensor], vec: np.ndarray, what: str) -> None:
    total = sum(t.numel() for t in tensors)
    if vec.shape != (total,):
        raise ValueError(f"{what} vector has shape {vec.shape}, model expects ({total},)")
    src = torch.from_numpy(np.array(vec, dtype=np.float32, copy=True))
    start = 0
    with torch.no_grad():
        for t in tensors:
            n = t.numel()
            t.copy_(src[start : start + n].view_as(t))
            start += n


def get_params(model: torch.nn.Module) -> np.ndarray:
    return _gather(trainable(model))


def set_params(model: torch.nn.Module, vec: np.ndarray) -> None:
    _scatter(trainable(model), vec, "parameter")


def get_buffers(model: torch.nn.Module) -> np.ndarray:
    return _gather(_buffers(model))


def set_buffers(model: torch.nn.Module, vec: np.ndarray) -> None:
    _scatter(_buffers(model), vec, "buffer")


def split_mask(mask: np.ndarray, params: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Cut a flat bool mask into per-tensor bool masks shaped like ``params``."""
    out, start = [], 0
    t = torch.from_numpy(np.array(mask, dtype=bool)).to(device)  # a copy: the mask may be a read-only view
    for p in params:
        n = p.numel()
        out.append(t[start : start + n].view_as(p))
        start += n
    return out
