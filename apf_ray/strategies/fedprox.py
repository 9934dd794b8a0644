"""FedProx (Li et al., MLSys 2020): FedAvg whose clients are pulled towards the global model.

Each client minimises its data loss plus the proximal term ``mu/2 · ‖w − w_global‖²`` over
its local steps, so on non-IID data a client cannot drift far from the model it started
from. The term's gradient ``mu · (w − w_global)`` is added to every local step's gradient
(the client half's ``gradient_term``); the server half is FedAvg's (every scalar, every round,
the sample-weighted mean). What it implements of the paper: the proximal term with a fixed
``mu``; not the paper's variable amount of local work per client (every client runs
``train.local_steps``) nor its adaptive ``mu``. The reported training loss is the data loss.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from apf_ray.records import RoundPlan
from apf_ray.strategies.base import register_strategy
from apf_ray.strategies.fedavg import FedAvg

if TYPE_CHECKING:  # strategies load with the config, which must not import torch
    import torch


class ProximalTerm:
    """Adds ``mu · (w − centre)`` to the flat gradient: the gradient of ``mu/2 · ‖w − centre‖²``."""

    def __init__(self, mu: float, centre: np.ndarray) -> None:
        self.mu = mu
        self.centre = centre
        self._on_device: torch.Tensor | None = None  # the centre, copied once per client round

    def __call__(self, params: torch.Tensor, grads: torch.Tensor) -> None:
        if self._on_device is None:
            self._on_device = params.new_tensor(np.array(self.centre))  # may be read-only
        grads.add_(params - self._on_device, alpha=self.mu)


@register_strategy
class FedProx(FedAvg):
    name = "fedprox"

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid")
        mu: float = Field(0.01, ge=0, le=10, description="weight of the proximal term mu/2·‖w − w_global‖²")

    def gradient_term(self, plan: RoundPlan, global_params: np.ndarray, client_state: dict) -> ProximalTerm | None:
        return ProximalTerm(self.options.mu, global_params) if self.options.mu else None
