"""APF with its ``aggregate`` overridden by the inherited one: the same arithmetic, but a strategy
that overrides ``aggregate`` keeps every upload on the server (``Strategy.streams`` is False), so
runs of it are the all-uploads path that aggregation on the way in must equal."""

from __future__ import annotations

from apf_ray.strategies.apf import APF


class AllUploadsAPF(APF):
    def aggregate(self, params, buffers, uploads):
        return super().aggregate(params, buffers, uploads)
