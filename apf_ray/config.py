"""Typed, validated experiment configuration: YAML file + overrides.

Every field has a range; pydantic turns a bad value into an error that names the dotted
field path (``train.local_steps``) and the allowed range, before any work starts. Options of
plug-ins (``strategy.options``, each ``strategy.uplink`` item) are validated against the
options model the plug-in declares, and reported under their own path
(``strategy.options.threshold``).

The defaults *are* the default workload (``configs/digits-lenet5.yaml``; a test checks that
the two agree): scikit-learn's digits, LeNet-5, 20 clients with 2 label shards each, 10 per
round, 100 rounds, APF with T = 0.2.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from apf_ray.errors import clip, did_you_mean, excerpt
from apf_ray.outputs import check_name
from apf_ray.uplink import OptionsError, build_stages, known_keys, validate_options

Name = Annotated[str, AfterValidator(check_name)]
"""A run's or a search's name: it becomes part of folder names, so a name, never a path."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Strict):
    dataset: str = Field("digits", description="registry name or import path 'pkg.mod:load_fn'")
    options: dict[str, Any] = Field(default_factory=dict, description="loader keyword options")
    partitioner: str = Field("shards", description="registry name or import path 'pkg.mod:Partitioner'")
    partition_options: dict[str, Any] = Field(default_factory=dict, description="partitioner keyword options")
    num_clients: int = Field(20, ge=1, le=1_000_000)


class ModelConfig(_Strict):
    name: str = Field("lenet5", description="registry name or import path 'pkg.mod:Class'")
    options: dict[str, Any] = Field(default_factory=dict)


class TrainConfig(_Strict):
    rounds: int = Field(100, ge=1)
    clients_per_round: int = Field(10, ge=1)
    local_steps: int = Field(10, ge=1, description="SGD steps per client per round")
    batch_size: int = Field(32, ge=1)
    lr: float = Field(0.05, gt=0, le=10)
    momentum: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    eval_every: int = Field(1, ge=1, description="evaluate the global model every N rounds (and the last)")
    eval_batch_size: int = Field(512, ge=1)


class StrategyConfig(_Strict):
    """Which strategy, its own options, and the uplink compression chain.

    Options belong to the strategy: an override that changes ``strategy.name`` starts the
    options from the new strategy's defaults (likewise ``model.name``, ``data.dataset`` and
    ``data.partitioner`` for their options).
    """

    name: str = Field("apf", description="registered strategy or import path 'pkg.mod:Class'")
    options: dict[str, Any] = Field(default_factory=dict, description="validated against the strategy's Options")
    uplink: list[Any] = Field(default_factory=list,
                              description="[sparsifier][, quantiser], e.g. [{name: topk, ratio: 0.1}, int8]")

    @model_validator(mode="after")
    def _validate_plugins(self) -> StrategyConfig:
        from apf_ray.strategies import strategy_class

        try:
            cls = strategy_class(self.name)
        except ValueError as err:
            raise OptionsError([(("name",), str(err), self.name)]) from None
        options = validate_options(cls.Options, self.options, ("options",))
        errors = []
        try:
            build_stages(self.uplink)
        except OptionsError as err:
            errors = [(("uplink", *loc), msg, value) for loc, msg, value in err.errors]
        if errors:
            raise OptionsError(errors)
        # Store the options with every default filled in, so config.yaml shows what ran.
        object.__setattr__(self, "options", options.model_dump(mode="json"))
        return self


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
    connect_timeout_s: float = Field(5.0, gt=0, le=300, description="bound on each step of reaching a "
                                     "cluster's address (TCP connect, then its answer), seconds")
    pools: list[PoolConfig] = Field(default_factory=lambda: [PoolConfig(max_actors=2)])
    round_timeout_s: float = Field(120.0, gt=0, description="per-round deadline for client work, seconds")
    min_clients: int | None = Field(None, ge=1, description="quorum; None = quorum_fraction")
    quorum_fraction: float = Field(0.5, gt=0, le=1)
    torch_threads: int = Field(1, ge=1, description="torch threads per client actor")
    object_store_mb: int = Field(512, ge=64, description="object store of a local cluster, MiB")
    startup_timeout_s: float = Field(180.0, gt=0, description="wait for client actors to get resources and "
                                     "start, seconds; then a pool short of num_actors (auto: 1) ends the run")
    control_timeout_s: float = Field(120.0, gt=0, description="bound on a control call to the server actor, s")
    result_timeout_s: float = Field(30.0, gt=0, description="fetch a finished client's result, seconds")
    max_error_chars: int = Field(500, ge=20, description="error text kept per failed client, characters")
    client_state_cache_mb: float = Field(256.0, ge=0, description="per-client strategy state (Top-k/Gaia "
                                         "residuals, partial-sync values) each client host keeps in memory, MiB; "
                                         "the rest is memory-mapped from the run's client_state/ folder")
    server_memory_gb: float | None = Field(
        None, gt=0, description="memory the server may give a round's uploads where it keeps them all (defence."
        "aggregation median/trimmed_mean, a strategy reading every upload), GB; None: what is available at start")
    expose: bool = Field(False, description="a local cluster listens on every interface (other machines can "
                                            "reach it; token auth stays on); False: 127.0.0.1 only")
    metrics_export: bool = Field(False, description="run Ray's Prometheus metrics exporter, which has no "
                                                    "authentication (on 127.0.0.1 unless expose)")

    @model_validator(mode="after")
    def _unique_pools(self) -> ClusterConfig:
        names = [p.name for p in self.pools]
        if not names:
            raise ValueError("cluster.pools must list at least one pool")
        if len(set(names)) != len(names):
            raise ValueError(f"cluster.pools names must be unique, got {names}")
        return self


class FaultConfig(_Strict):
    """Chaos testing: make clients fail, or send hostile uploads, on purpose (seeded per round and client)."""

    client_failure_prob: float = Field(0.0, ge=0, le=1, description="per client per round, seeded")
    corrupt_upload_prob: float = Field(0.0, ge=0, le=1,
                                       description="per client per round: send a corrupted upload instead")
    corrupt_kind: Literal["nan", "inf", "huge", "scale", "garbage", "samples"] = Field(
        "nan", description="what a corrupted upload carries (apf_ray/faults.py)")
    corrupt_scale: float = Field(1000.0, description="scale: the factor applied to the sent values (negative: "
                                                     "a sign-flipping attack)")


class DefenceConfig(_Strict):
    """What the server accepts from clients, and how it combines what it accepted.

    Every upload is checked before aggregation (structure against the round's plan, finite
    values, a sample count no larger than the client's partition, the size of its change); a
    refused one is recorded as ``rejected`` and never reaches the model. The default bound on
    an update is the global model's own L2 norm: an honest round moves it far less (LeNet-5
    on non-IID digits 3–13%, on IID digits ~1%, ResNet-18 ~8%, the char-LSTM ~4%), a 1000×
    boosted update or a 1e30 value far more. BatchNorm statistics are absolute values, not
    deltas, and move more in early rounds, hence their own, looser bound. ``median`` and
    ``trimmed_mean`` bound what clients *within* the limits can do (unweighted: sample
    counts are the clients' own claims).
    """

    max_update_norm: float | None = Field(None, gt=0, description="absolute bound on an update's L2 norm")
    max_update_ratio: float | None = Field(
        1.0, gt=0, description="bound on an update's L2 norm relative to max(‖global model‖₂, 1)")
    max_buffer_ratio: float | None = Field(
        100.0, gt=0, description="bound on the L2 norm of the buffers' change relative to max(‖buffers‖₂, √count)")
    aggregation: Literal["mean", "median", "trimmed_mean"] = Field(
        "mean", description="mean: the strategy's own aggregate (default: sample-weighted); median, trimmed_mean: "
                "the uploads' coordinate-wise consensus, before any strategy's aggregate")
    trim_fraction: float = Field(0.1, ge=0, lt=0.5,
                                 description="trimmed_mean: share of uploads cut at each end, per coordinate")


class OutputConfig(_Strict):
    dir: str | None = Field(None, description="run directory; default runs/<name>-<time>")
    checkpoint_every: int = Field(10, ge=0, description="rounds between checkpoints (0 = only at the end)")
    keep_checkpoints: int = Field(3, ge=1, description="newest checkpoints kept; older ones are deleted")
    tensorboard: bool = True
    per_client_tensorboard: bool = False
    plots: bool = True


class ExperimentConfig(_Strict):
    name: Name = "digits-lenet5"
    seed: int = Field(0, ge=0)
    data: DataConfig = Field(default_factory=lambda: DataConfig(partition_options={"shards_per_client": 2}))
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    # The paper's T = 0.05 freezes little in a short run (SPEC §6): scalars need many checks of
    # consistent oscillation before P = |E|/A falls under T. T = 0.2 shows the effect within
    # the 100-round default workload; search it with `apf-ray tune` for yours.
    strategy: StrategyConfig = Field(default_factory=lambda: StrategyConfig(options={"threshold": 0.2}))
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    faults: FaultConfig = Field(default_factory=FaultConfig)
    defence: DefenceConfig = Field(default_factory=DefenceConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)

    @model_validator(mode="after")
    def _sampling_fits(self) -> ExperimentConfig:
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

    def plugin_names(self) -> list[str]:
        """Every plug-in the config names (strategy, uplink stages, model, dataset, partitioner):
        registered names and import paths alike."""
        from apf_ray.compression import stage_spec

        stages = [stage_spec(item)[0] for item in self.strategy.uplink]
        return [self.strategy.name, *stages, self.model.name, self.data.dataset, self.data.partitioner]

    def quorum(self) -> int:
        """Clients that must report for a round to count."""
        if self.cluster.min_clients is not None:
            return self.cluster.min_clients
        return max(1, round(self.cluster.quorum_fraction * self.train.clients_per_round))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-ready mapping that :func:`build_config` turns back into this config."""
        return self.model_dump(mode="json")


_PLUGIN_OPTIONS = {
    ("strategy", "name"): "options",
    ("model", "name"): "options",
    ("data", "dataset"): "options",
    ("data", "partitioner"): "partition_options",
}
"""Name fields of plug-ins → the sibling field holding that plug-in's options."""


def _plugin_default(path: list[str]) -> Any:
    section = ExperimentConfig.model_fields[path[0]].default_factory()
    return getattr(section, path[1])


class ConfigError(ValueError):
    """A config that cannot be used; the message names the field or file."""


Overrides = Sequence[str] | Mapping[str, Any]
"""``["train.lr=0.1", ...]`` (values parsed as YAML) or ``{"train.lr": 0.1, ...}`` (typed)."""


def _override_items(overrides: Overrides) -> list[tuple[str, list[str], Any]]:
    """(label for errors, path, value) per override."""
    items = []
    if isinstance(overrides, Mapping):
        for key, value in overrides.items():
            items.append((f"{key}={excerpt(value)}", _split_key(str(key), f"override {excerpt(key)}"), value))
        return items
    for item in overrides:
        label = f"--set {clip(item)}"
        if "=" not in item:
            raise ConfigError(f"{label}: expected key=value")
        key, raw = item.split("=", 1)
        try:
            value = load_yaml(raw) if raw.strip() else None
        except yaml.YAMLError as err:
            raise ConfigError(f"{label}: the value is not valid YAML ({yaml_problem(err)})") from None
        items.append((label, _split_key(key, label), value))
    return items


def _split_key(key: str, label: str) -> list[str]:
    path = [p for p in key.strip().split(".")]
    if not path or any(not p for p in path):
        raise ConfigError(f"{label}: the key must be a dotted path like train.lr")
    return path


def _set_path(root: dict[str, Any], path: list[str], value: Any, label: str) -> None:
    node: Any = root
    for depth, part in enumerate(path):
        last = depth == len(path) - 1
        where = clip(".".join(path[:depth])) or "the config"
        if isinstance(node, list):
            if not part.isdigit():
                raise ConfigError(f"{label}: {where} is a list; {excerpt(part)} is not an index "
                                  f"(e.g. {clip('.'.join([*path[:depth], '0', *path[depth:]]))})")
            index = int(part)
            if index >= len(node):
                raise ConfigError(f"{label}: {where} has {len(node)} item(s); index {index} is out of range")
            if last:
                node[index] = value
                return
            node = node[index]
        elif isinstance(node, dict):
            if last:
                options_key = _PLUGIN_OPTIONS.get(tuple(path))
                if options_key and node.get(part, _plugin_default(path)) != value:
                    node.pop(options_key, None)  # a plug-in's options belong to the plug-in being replaced
                node[part] = value
                return
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
        else:
            raise ConfigError(f"{label}: {where} is a value ({excerpt(node)}), not a section")


def apply_overrides(raw: Mapping[str, Any], overrides: Overrides) -> tuple[dict[str, Any], list[tuple[str, list[str]]]]:
    """A new mapping with the overrides applied, and (label, path) of each for error messages."""
    out = yaml.safe_load(yaml.safe_dump(dict(raw))) or {}
    applied = []
    for label, path, value in _override_items(overrides):
        _set_path(out, path, value, label)
        applied.append((label, path))
    return out, applied


def _error_lines(err: ValidationError) -> list[tuple[tuple, str, Any]]:
    """(location, message, input) per error, with plug-in option errors at their own path.

    An unknown key says so and suggests the closest known one (``train.lrr: unknown key; did
    you mean 'lr'?``).
    """
    out = []
    for e in err.errors():
        cause = (e.get("ctx") or {}).get("error")
        if isinstance(cause, OptionsError):
            out += [((*e["loc"], *loc), msg, value) for loc, msg, value in cause.errors]
        elif e["type"] == "extra_forbidden":
            known = known_keys(ExperimentConfig, e["loc"][:-1])
            out.append((e["loc"], "unknown key" + did_you_mean(e["loc"][-1], known), None))
        else:
            msg = e["msg"].removeprefix("Value error, ")
            out.append((e["loc"], msg, e.get("input")))
    return out


def _format_validation(err: ValidationError, source: str, applied: list[tuple[str, list[str]]]) -> str:
    """One line per error: the file (unless an override explains it), the field, the message,
    an excerpt of the value (:func:`~apf_ray.errors.excerpt`), and the override it came from."""
    lines = []
    for loc, msg, value in _error_lines(err):
        if loc:
            field = ".".join(str(p) for p in loc) + ": "
            origin = next((label for label, path in reversed(applied)
                           if [str(p) for p in loc[: len(path)]] == path or path[: len(loc)] == [str(p) for p in loc]),
                          None)
        else:  # a rule across fields names them in its message: blame the overrides of those fields
            field = ""
            origin = ", ".join(label for label, path in applied if ".".join(path) in msg) or None
        shown = "" if value is None or isinstance(value, dict) else f" (got {excerpt(value)})"
        where = f" — from {origin}" if origin else ""
        lines.append(f"{'' if origin else source + ': '}{field}{msg}{shown}{where}")
    return "\n".join(lines)


def build_config(raw: Mapping[str, Any], overrides: Overrides = (), source: str = "<dict>") -> ExperimentConfig:
    """Validate a raw mapping (plus overrides) into an :class:`ExperimentConfig`."""
    merged, applied = apply_overrides(raw, overrides)
    try:
        return ExperimentConfig.model_validate(merged)
    except ValidationError as err:
        raise ConfigError(_format_validation(err, source, applied)) from None


MAX_YAML_NODES = 100_000
"""The most values (scalars, lists, mappings) a YAML text may stand for once its aliases are expanded.

An alias reuses a value without copying it, so a few hundred bytes of nested aliases (``b:
[*a, *a, ...]``, ``c: [*b, *b, ...]``) stand for billions of values: every later step that
walks them (validation, an error message, ``config.yaml``) would run out of memory. A real
config has a few hundred values.
"""


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader that refuses alias expansion beyond :data:`MAX_YAML_NODES` values."""

    def get_single_node(self) -> yaml.Node | None:
        node = super().get_single_node()
        if node is not None and _expanded_size(node, {}, set()) > MAX_YAML_NODES:
            raise yaml.YAMLError(f"its aliases expand to more than {MAX_YAML_NODES:,} values (an alias bomb?)")
        return node


def _expanded_size(node: yaml.Node, sizes: dict[int, int], open_nodes: set[int]) -> int:
    """Values ``node`` stands for with every alias expanded; stops counting past the bound.

    ``sizes`` memoises shared nodes (each is counted once per use, walked once); a node that
    contains itself (``&a [*a]``) expands without end.
    """
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in open_nodes:
        return MAX_YAML_NODES + 1
    open_nodes.add(key)
    children = (node.value if isinstance(node, yaml.SequenceNode)
                else [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else [])
    total = 1
    for child in children:
        total += _expanded_size(child, sizes, open_nodes)
        if total > MAX_YAML_NODES:
            break
    open_nodes.discard(key)
    sizes[key] = total
    return total


def load_yaml(text: str) -> Any:
    """``yaml.safe_load`` with alias expansion bounded (:data:`MAX_YAML_NODES`)."""
    return yaml.load(text, Loader=_BoundedLoader)  # a SafeLoader: builds only plain data


def yaml_problem(err: yaml.YAMLError) -> str:
    """One line for a YAML error: what is wrong and where (line and column, counted from 1)."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).strip().splitlines()[0]
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


SEARCH_FILE_KEYS = ("search_space", "objective")
"""Top-level keys of a search file (``apf-ray tune``) that no train config has."""


def is_search_file(raw: Mapping[str, Any]) -> bool:
    """Whether a mapping read from a YAML file is a search file for ``apf-ray tune``, not a train config."""
    return any(key in raw for key in SEARCH_FILE_KEYS)


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """A YAML file holding a non-empty mapping; ConfigError naming the file otherwise.

    Checked: the file exists and is readable, is UTF-8 text (not binary), is YAML (the error
    says at which line and column it is not), stays within :data:`MAX_YAML_NODES` values, and
    holds settings (an empty file is an error, not the defaults).
    """
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"config file {p} is a directory")
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = p.read_bytes()
    except OSError as err:
        raise ConfigError(f"cannot read config file {p}: {err.strerror}") from None
    if b"\0" in data:
        raise ConfigError(f"config file {p} is a binary file, not YAML text")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {p} is not UTF-8 text (byte 0x{data[err.start]:02x} at offset "
                          f"{err.start})") from None
    try:
        raw = load_yaml(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {p} is not valid YAML: {yaml_problem(err)}") from None
    if raw is None:
        raise ConfigError(f"config file {p} is empty; leave out --config for the default workload")
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {p} must hold a mapping of settings at the top level, "
                          f"not {type(raw).__name__} {excerpt(raw)}")
    return raw


def load_config(path: str | Path | None = None, overrides: Overrides = ()) -> ExperimentConfig:
    """Load a YAML config (None: the default workload) and apply overrides."""
    if path is None:
        return build_config(ExperimentConfig().to_dict(), overrides, "defaults")
    raw = read_yaml_mapping(path)
    if is_search_file(raw):
        raise ConfigError(f"{path} is a search file for apf-ray tune (it has "
                          f"{' and '.join(k for k in SEARCH_FILE_KEYS if k in raw)}), not a train config: "
                          f"run apf-ray tune --config {path}")
    return build_config(raw, overrides, str(path))
