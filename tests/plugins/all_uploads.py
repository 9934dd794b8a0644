"""APF and GWPF with ``aggregate`` overridden by the inherited one: the same arithmetic, but a
strategy that overrides ``aggregate`` keeps every upload on the server (``Strategy.streams`` is
False), so runs of these are the all-uploads path that aggregation on the way in must equal."""

from __future__ import annotations

from apf_ray.strategies.apf import APF
from apf_ray.strategies.gwpf import GWPF


class AllUploadsAPF(APF):
    def aggregate(self, params, buffers, uploads):
        return super().aggregate(params, buffers, uploads)


class AllUploadsGWPF(GWPF):
    def aggregate(self, params, buffers, uploads):
        return super().aggregate(params, buffers, uploads)
