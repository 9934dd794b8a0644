"""Local training with a freezing mask, and evaluation.

Frozen scalars must stay bit-identical to the server's values (SPEC §3). The optimiser is a
masked SGD: at frozen positions the step is exactly zero (gradient, weight decay and the
momentum buffer are all held at 0), and ``x + (-lr * 0.0) == x`` bit for bit.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from apf_ray.flat import get_buffers, get_params, set_buffers, set_params, split_mask, trainable


@dataclass(frozen=True)
class TrainSettings:
    local_steps: int
    batch_size: int
    lr: float
    momentum: float = 0.0
    weight_decay: float = 0.0


@dataclass
class LocalResult:
    params: np.ndarray  # flat float32 after training
    buffers: np.ndarray  # flat float32 non-trainable state after training
    loss: float  # mean training loss over the local steps
    num_samples: int
    compute_s: float  # wall seconds spent training (measured)


def _masked_sgd_step(
    params: list[torch.Tensor],
    masks: list[torch.Tensor] | None,
    momenta: list[torch.Tensor | None],
    s: TrainSettings,
) -> None:
    with torch.no_grad():
        for i, p in enumerate(params):
            if p.grad is None:
                continue
            g = p.grad
            if s.weight_decay:
                g = g.add(p, alpha=s.weight_decay)
            if masks is not None:
                g = torch.where(masks[i], g, torch.zeros((), dtype=g.dtype, device=g.device))
            if s.momentum:
                buf = momenta[i]
                if buf is None:
                    buf = momenta[i] = g.clone()
                else:
                    buf.mul_(s.momentum).add_(g)
                g = buf
            p.add_(g, alpha=-s.lr)


def batch_indices(num_samples: int, steps: int, batch_size: int, seed: int) -> np.ndarray:
    """Deterministic minibatch schedule: reshuffled epochs, ``steps`` × ``batch_size`` indices."""
    rng = np.random.default_rng(seed)
    bs = min(batch_size, num_samples)
    need = steps * bs
    epochs = -(-need // num_samples)
    order = np.concatenate([rng.permutation(num_samples) for _ in range(epochs)])
    return order[:need].reshape(steps, bs)


def loss_fn(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y)


def train_local(
    model: torch.nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    params: np.ndarray,
    buffers: np.ndarray,
    mask: np.ndarray | None,
    settings: TrainSettings,
    seed: int,
    device: torch.device | str = "cpu",
) -> LocalResult:
    """Train ``model`` from the given flat values; scalars where ``mask`` is False stay fixed."""
    if len(x) == 0:
        raise ValueError("client has no training samples")
    device = torch.device(device)
    start = time.perf_counter()
    model.to(device)
    set_params(model, params)
    set_buffers(model, buffers)
    model.train()
    plist = trainable(model)
    masks = None if mask is None or mask.all() else split_mask(mask, plist, device)
    momenta: list[torch.Tensor | None] = [None] * len(plist)
    xt = torch.from_numpy(np.ascontiguousarray(x)).to(device)
    yt = torch.from_numpy(np.ascontiguousarray(y)).to(device)
    losses = torch.zeros(settings.local_steps, dtype=torch.float64)
    for step, idx in enumerate(batch_indices(len(x), settings.local_steps, settings.batch_size, seed)):
        bidx = torch.from_numpy(idx).to(device)
        model.zero_grad(set_to_none=True)
        loss = loss_fn(model(xt[bidx]), yt[bidx])
        loss.backward()
        _masked_sgd_step(plist, masks, momenta, settings)
        losses[step] = loss.detach().to("cpu", torch.float64)
    trained_params, trained_buffers = get_params(model), get_buffers(model)
    return LocalResult(
        params=trained_params,
        buffers=trained_buffers,
        loss=float(losses.mean()),
        num_samples=len(x),
        compute_s=time.perf_counter() - start,
    )


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, x: np.ndarray, y: np.ndarray, *, batch_size: int = 512, device: str = "cpu"
) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of ``model`` on a test set."""
    model.eval().to(device)
    correct, total_loss = 0, 0.0
    for start in range(0, len(x), batch_size):
        # Copies: the test arrays may be read-only object-store views, which torch will not wrap.
        xb = torch.from_numpy(np.array(x[start : start + batch_size])).to(device)
        yb = torch.from_numpy(np.array(y[start : start + batch_size])).to(device)
        logits = model(xb)
        total_loss += float(F.cross_entropy(logits, yb, reduction="sum"))
        correct += int((logits.argmax(dim=1) == yb).sum())
    n = max(len(x), 1)
    return correct / n, total_loss / n
