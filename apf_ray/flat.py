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


@dataclass(frozen=True, eq=False)
class FlatBinding:
    """A model whose trainable parameters, and their gradients, are views into two flat tensors.

    Local training then touches the whole vector with one operation per step (zero the
    gradients, hold frozen scalars, update) instead of one per tensor: per-operation overhead,
    not arithmetic, dominates small models such as LeNet-5.
    """

    params: torch.Tensor  # 1-D float32, in ``model.parameters()`` order
    grads: torch.Tensor  # 1-D float32, same layout; every ``p.grad`` is a view into it
    device: torch.device  # as asked for (``cuda`` and ``cuda:0`` are different requests)


def bind_flat(model: torch.nn.Module, device: torch.device) -> FlatBinding:
    """Rebind ``model``'s trainable parameters and gradients to flat storage on ``device`` (once).

    The binding is kept on the model; moving the model to another device rebinds it. Values are
    kept. Every parameter then always has a gradient (zero if it took no part in a step).
    """
    bound: FlatBinding | None = getattr(model, "_apf_flat_binding", None)
    if bound is not None and bound.device == device:
        return bound
    model.to(device)
    plist = trainable(model)
    total = sum(p.numel() for p in plist)
    binding = FlatBinding(torch.empty(total, dtype=torch.float32, device=device),
                          torch.zeros(total, dtype=torch.float32, device=device), device)
    start = 0
    with torch.no_grad():
        for p in plist:
            n = p.numel()
            binding.params[start : start + n].copy_(p.detach().reshape(-1))
            p.data = binding.params[start : start + n].view_as(p)
            p.grad = binding.grads[start : start + n].view_as(p)
            start += n
    model._apf_flat_binding = binding
    return binding
