"""APF that raises at a chosen round: injects a failing trial into a search (``tests.plugins.exploding:Exploding``)."""

from __future__ import annotations

from pydantic import Field

from apf_ray.strategies.apf import APF, APFOptions


class ExplodingOptions(APFOptions):
    explode_at_round: int = Field(0, ge=0, description="raise when this round is aggregated (0: never)")


class Exploding(APF):
    name = "exploding"
    Options = ExplodingOptions

    def observe(self, params):
        self.rounds_seen = getattr(self, "rounds_seen", 0) + 1
        if self.rounds_seen == self.options.explode_at_round:
            raise RuntimeError(f"exploding on purpose at round {self.rounds_seen}")
        super().observe(params)
