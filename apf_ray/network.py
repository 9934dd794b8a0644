"""The simulated network: per-pool links that turn wire bytes into seconds (SPEC §4).

A client's round time is its critical path: downlink transfer, measured compute, uplink
transfer. A round takes as long as its slowest reporting client.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from apf_ray.config import NetworkConfig


def transfer_s(nbytes: int, mbps: float, latency_ms: float) -> float:
    """Seconds to move ``nbytes`` over a ``mbps`` megabit/s link with ``latency_ms`` latency."""
    return nbytes * 8 / (mbps * 1e6) + latency_ms / 1000.0


@dataclass(frozen=True)
class NetworkModel:
    """Links by pool name."""

    links: Mapping[str, NetworkConfig]

    def client_round_s(self, pool: str, bytes_down: int, compute_s: float, bytes_up: int) -> float:
        """Simulated seconds from the start of the download to the end of the upload."""
        link = self.links[pool]
        return (transfer_s(bytes_down, link.down_mbps, link.latency_ms) + compute_s
                + transfer_s(bytes_up, link.up_mbps, link.latency_ms))
