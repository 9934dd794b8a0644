"""Typed, validated experiment configuration (YAML file + ``--set key=value`` overrides).

Every field has a range; pydantic turns a bad value into an error that names the dotted
field path (``train.local_steps``) and the allowed range, before any work starts.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

STRATEGY_NAMES = ("fedavg", "apf", "partial_sync", "permanent", "topk", "gaia", "cmfl")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Strict):
    dataset: str = "digits"
    options: dict[str, Any] = Field(default_factory=dict, description="loader options")
    partitioner: Literal["iid", "shards", "dirichlet", "natural"] = "shards"
    partition_options: dict[str, Any] = Field(default_factory=dict)
    num_clients: int = Field(20, ge=1, le=1_000_000)


class ModelConfig(_Strict):
    name: str = Field("lenet5", description="registry name or import path 'pkg.mod:Class'")
    options: dict[str, Any] = Field(default_factory=dict)


class TrainConfig(_Strict):
    rounds: int = Field(60, ge=1)
    clients_per_round: int = Field(10, ge=1)
    local_steps: int = Field(20, ge=1, description="SGD steps per client per round")
    batch_size: int = Field(32, ge=1)
    lr: float = Field(0.05, gt=0, le=10)
    momentum: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    eval_every: int = Field(1, ge=1, description="evaluate the global model every N rounds")
    eval_batch_size: int = Field(512, ge=1)


class APFConfig(_Strict):
    """SPEC §2 controller knobs (defaults from the authors' code)."""

    alpha: float = Field(0.99, ge=0, lt=1)
    threshold: float = Field(0.05, gt=0, le=1)
    tighten_ratio: float = Field(0.8, gt=0, le=1)
    threshold_min: float = Field(1e-4, gt=0, le=1)
    check_every: int = Field(1, ge=1)
    aggressive_prob: float = Field(0.0, ge=0, le=1)
    period_policy: str = "aimd"

    @field_validator("period_policy")
    @classmethod
    def _policy(cls, v: str) -> str:
        if v in ("aimd", "additive", "multiplicative", "permanent") or re.fullmatch(r"fixed:[1-9]\d*", v):
            return v
        raise ValueError("must be one of aimd, additive, multiplicative, permanent, fixed:N (N ≥ 1)")


class TopKConfig(_Strict):
    ratio: float = Field(0.1, gt=0, le=1, description="fraction of scalars sent per upload")


class GaiaConfig(_Strict):
    threshold: float = Field(0.01, gt=0, description="initial significance |Δ/w|")
    decay: float = Field(0.95, gt=0, le=1, description="threshold multiplier per round")
    min_threshold: float = Field(1e-3, gt=0)


class CMFLConfig(_Strict):
    threshold: float = Field(0.5, ge=0, le=1, description="min sign agreement with last global update")


class StrategyConfig(_Strict):
    name: str = "apf"
    value_dtype: Literal["float32", "float16", "bfloat16", "int8"] = Field(
        "float32", description="wire dtype of uploaded values (composes with any strategy)"
    )
    apf: APFConfig = Field(default_factory=APFConfig)
    topk: TopKConfig = Field(default_factory=TopKConfig)
    gaia: GaiaConfig = Field(default_factory=GaiaConfig)
    cmfl: CMFLConfig = Field(default_factory=CMFLConfig)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if v not in STRATEGY_NAMES:
            raise ValueError(f"unknown strategy {v!r}; choose one of {', '.join(STRATEGY_NAMES)}")
        return v


class NetworkConfig(_Strict):
    """Simulated link of one client group: transfer time = bytes / bandwidth + latency."""

    up_mbps: float = Field(10.0, gt=0, description="uplink bandwidth, megabit/s")
    down_mbps: float = Field(50.0, gt=0, description="downlink bandwidth, megabit/s")
    latency_ms: float = Field(20.0, ge=0, description="one-way latency per message, ms")


class PoolConfig(_Strict):
    """A hardware group: client actors with their own Ray resources and network profile."""

    name: str = "cpu"
    num_actors: int | Literal["auto"] = Field(
        "auto", description="actors in this pool; 'auto' follows the cluster's resources"
    )
    max_actors: int = Field(8, ge=1, description="upper bound for 'auto'")
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    resources: dict[str, float] = Field(default_factory=dict, description="custom Ray resources")
    share: float = Field(1.0, gt=0, description="relative share of the virtual clients")
    network: NetworkConfig = Field(default_factory=NetworkConfig)

    @field_validator("num_actors")
    @classmethod
    def _actors(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 1:
            raise ValueError("must be ≥ 1 or 'auto'")
        return v


class ClusterConfig(_Strict):
    address: str | None = Field(None, description="existing Ray cluster; None starts a local one")
    pools: list[PoolConfig] = Field(default_factory=lambda: [PoolConfig()])
    round_timeout_s: float = Field(300.0, gt=0, description="per-round deadline, seconds")
    min_clients: int | None = Field(None, ge=1, description="quorum; None = quorum_fraction")
    quorum_fraction: float = Field(0.5, gt=0, le=1)
    torch_threads: int = Field(1, ge=1, description="torch threads per client actor")
    object_store_mb: int = Field(512, ge=64, description="object store of a local cluster")

    @model_validator(mode="after")
    def _unique_pools(self) -> "ClusterConfig":
        names = [p.name for p in self.pools]
        if not names:
            raise ValueError("cluster.pools must list at least one pool")
        if len(set(names)) != len(names):
            raise ValueError(f"cluster.pools names must be unique, got {names}")
        return self


class FaultConfig(_Strict):
    """Chaos testing: make clients fail on purpose to exercise dropping and quorum."""

    client_failure_prob: float = Field(0.0, ge=0, le=1, description="per client per round, seeded")


class OutputConfig(_Strict):
    dir: str | None = Field(None, description="run directory; default runs/<name>-<time>")
    checkpoint_every: int = Field(10, ge=0, description="rounds between checkpoints (0 = off)")
    tensorboard: bool = True
    per_client_tensorboard: bool = False
    plots: bool = True


class ExperimentConfig(_Strict):
    name: str = "experiment"
    seed: int = Field(0, ge=0)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    strategy: StrategyConfig = Field(default_factory=StrategyConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    faults: FaultConfig = Field(default_factory=FaultConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)

    @model_validator(mode="after")
    def _sampling_fits(self) -> "ExperimentConfig":
        if self.train.clients_per_round > self.data.num_clients:
            raise ValueError(
                f"train.clients_per_round ({self.train.clients_per_round}) must be ≤ "
                f"data.num_clients ({self.data.num_clients})"
            )
        if self.cluster.min_clients is not None and self.cluster.min_clients > self.train.clients_per_round:
            raise ValueError(
                f"cluster.min_clients ({self.cluster.min_clients}) must be ≤ "
                f"train.clients_per_round ({self.train.clients_per_round})"
            )
        return self

    def quorum(self) -> int:
        """Clients that must report for a round to count."""
        if self.cluster.min_clients is not None:
            return self.cluster.min_clients
        return max(1, int(round(self.cluster.quorum_fraction * self.train.clients_per_round)))


class ConfigError(ValueError):
    """A config that cannot be used; the message names the field or file."""


def _format_validation(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "<root>"
        lines.append(f"  {field}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` → (["a","b","c"], yaml-parsed value)."""
    if "=" not in item:
        raise ConfigError(f"--set expects key=value, got {item!r}")
    key, raw = item.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"--set has an empty key in {item!r}")
    return path, yaml.safe_load(raw) if raw.strip() else None


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply dotted overrides to a raw config mapping (a new dict; the input is kept)."""
    out = yaml.safe_load(yaml.safe_dump(raw)) or {}
    for item in overrides:
        path, value = parse_override(item)
        node = out
        for part in path[:-1]:
            if part.isdigit() and isinstance(node, list):
                node = node[int(part)]
                continue
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, (dict, list)):
                raise ConfigError(f"--set {item!r}: {part!r} is not a section")
            node = child
        last = path[-1]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return out


def build_config(raw: dict[str, Any], overrides: list[str] = (), source: str = "<dict>") -> ExperimentConfig:
    try:
        return ExperimentConfig.model_validate(apply_overrides(raw, list(overrides)))
    except ValidationError as err:
        raise ConfigError(_format_validation(err, source)) from None


def load_config(path: str | Path | None, overrides: list[str] = ()) -> ExperimentConfig:
    """Load a YAML config (None = all defaults) and apply ``--set`` overrides."""
    raw: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {p} is not valid YAML: {err}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {p} must hold a mapping at the top level")
        source = str(p)
    return build_config(raw, overrides, source)
