"""Local training with a freezing mask, and evaluation.

Frozen scalars must stay bit-identical to the server's values (SPEC §3). The optimiser is a
masked SGD: at frozen positions the step is exactly zero (gradient, weight decay and the
momentum buffer are all held at 0), and ``x + (-lr * 0.0) == x`` bit for bit.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from apf_ray.flat import FlatBinding, bind_flat, get_buffers, set_buffers


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


def _masked_sgd_step(flat: FlatBinding, frozen: torch.Tensor | None, momentum: list[torch.Tensor],
                     s: TrainSettings) -> None:
    """One SGD step on the whole flat vector; frozen positions get exactly ``p + (-0.0) == p``.

    The gradient of a frozen scalar is set to +0.0 before weight decay's and momentum's
    contribution is used, so its step is ``-lr · 0.0 = -0.0`` and its value does not change in
    any bit (−0.0, subnormals and NaN included). Holding it with ``index_fill_`` on precomputed
    positions costs one pass over them; a boolean ``where``/``masked_fill`` costs ~40× more here.
    """
    with torch.no_grad():
        g = flat.grads
        if s.weight_decay:
            g.add_(flat.params, alpha=s.weight_decay)
        if frozen is not None:
            g.index_fill_(0, frozen, 0.0)
        if s.momentum:
            if not momentum:
                momentum.append(g.clone())
            else:
                momentum[0].mul_(s.momentum).add_(g)
            g = momentum[0]
        flat.params.add_(g, alpha=-s.lr)


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
    gradient_term: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
) -> LocalResult:
    """Train ``model`` from the given flat values; scalars where ``mask`` is False stay fixed.

    ``gradient_term(params, grads)``, if given, adds the gradient of an extra local loss term
    (a strategy's, e.g. FedProx's proximal term) to the flat gradient in place after each
    backward pass; the reported loss is the data loss alone.
    """
    if len(x) == 0:
        raise ValueError("client has no training samples")
    device = torch.device(device)
    start = time.perf_counter()
    flat = bind_flat(model, device)
    if params.shape != flat.params.shape:
        raise ValueError(f"parameter vector has shape {params.shape}, model expects {tuple(flat.params.shape)}")
    flat.params.copy_(torch.from_numpy(np.array(params, dtype=np.float32)))  # a copy: may be read-only
    set_buffers(model, buffers)
    model.train()
    frozen = None
    if mask is not None and not mask.all():
        frozen = torch.from_numpy(np.flatnonzero(~np.asarray(mask, dtype=bool))).to(device)
    momentum: list[torch.Tensor] = []
    xt = torch.from_numpy(np.ascontiguousarray(x)).to(device)
    yt = torch.from_numpy(np.ascontiguousarray(y)).to(device)
    losses = torch.zeros(settings.local_steps, dtype=torch.float64)
    for step, idx in enumerate(batch_indices(len(x), settings.local_steps, settings.batch_size, seed)):
        bidx = torch.from_numpy(idx).to(device)
        flat.grads.zero_()
        loss = loss_fn(model(xt[bidx]), yt[bidx])
        loss.backward()
        if gradient_term is not None:
            with torch.no_grad():
                gradient_term(flat.params, flat.grads)
        _masked_sgd_step(flat, frozen, momentum, settings)
        losses[step] = loss.detach().to("cpu", torch.float64)
    trained_params = flat.params.to("cpu").numpy().copy()
    trained_buffers = get_buffers(model)
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
