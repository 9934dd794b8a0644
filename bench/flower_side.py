"""Flower side of ``bench/vs_flower.py``: the shared workload on Flower 1.42's Ray simulation.

Run by ``vs_flower.py`` as a subprocess with the Flower virtualenv's Python
(``bench/setup_flower_venv.sh``), never with apf-ray's Ray 2.60:

    bench/.venv-flower/bin/python bench/flower_side.py SPEC.json

``SPEC.json`` names the ``.npz`` written by ``vs_flower.py`` (training/test arrays, the
per-client index arrays of apf-ray's ``shards`` partitioner, apf-ray's initial model as one
flat vector, and for every round the sampled client ids and their per-client seeds) and the
run's settings. From this repository it imports only torch/numpy code: the ``LeNet5`` class,
``batch_indices`` (the minibatch schedule) and ``evaluate`` from ``apf_ray.training``,
``weighted_mean`` from ``apf_ray.aggregation`` and the flat-vector helpers of ``apf_ray.flat``
-- so both systems do the same arithmetic.

What runs (Flower's current Message API):

* ``ClientApp`` with one ``@train`` function: it trains the partition named in the message's
  ``ConfigRecord`` (``partition-id``) for ``local-steps`` plain SGD steps with apf-ray's
  minibatch schedule and per-client seed, and replies with the trained weights
  (``ArrayRecord`` from the ``state_dict``) and ``num-examples``.
* ``ServerApp`` whose ``main`` runs ``FedAvg.start`` with a subclass that replaces node
  sampling: round r sends one message to each of the K partitions apf-ray samples in round r
  (from the ``.npz``). Aggregation (spec ``aggregation``): ``apf`` (default) averages with
  apf-ray's arithmetic so the two systems' models are bit-identical; ``flower`` is Flower's
  own ``aggregate_arrayrecords`` (float32, in reply arrival order, so runs differ in the last
  bits and, amplified by training, visibly after a few rounds). Federated evaluation is off
  (``fraction_evaluate=0``); the global model is evaluated centrally on the test set after
  every round by ``evaluate_fn``, as apf-ray's server does.
* ``run_simulation`` with the Ray backend: ``init_args`` go to ``ray.init`` (a new local
  cluster with ``num_cpus`` CPUs), ``client_resources`` size each ``ClientAppActor``; the
  pool holds ``floor(cluster CPUs / client num_cpus)`` actors.

Why the partition id travels in the config: a simulated SuperNode's partition id is only in
the ``Context`` on the client side (``node_config["partition-id"]``); the ServerApp sees random
node ids with no partition attached (``Grid.get_node_ids()`` is a set). Every client here is
stateless, so message j of a round goes to a distinct node (node ``sorted(node_ids)[pid]``)
and names its partition; Flower does exactly the same work as if node and partition matched.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from apf_ray.aggregation import weighted_mean
from apf_ray.flat import get_params, set_params
from apf_ray.models.nets import LeNet5
from apf_ray.training import batch_indices, evaluate

DATA_ENV = "VS_FLOWER_DATA"  # path of the shared .npz, inherited by the Ray workers


# --------------------------------------------------------------------------- shared data
@dataclass(frozen=True)
class SharedData:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    partitions: list[np.ndarray]
    init_params: np.ndarray
    num_classes: int
    input_shape: tuple[int, ...]

    def model(self) -> LeNet5:
        model = LeNet5(num_classes=self.num_classes, input_shape=self.input_shape)
        set_params(model, self.init_params)
        return model


def load_shared(path: str | os.PathLike[str]) -> SharedData:
    """The arrays and partitions ``vs_flower.py`` saved (partitions as concatenated indices + offsets)."""
    with np.load(path) as z:
        offsets = z["partition_offsets"]
        flat = z["partition_indices"]
        return SharedData(
            x_train=z["x_train"], y_train=z["y_train"], x_test=z["x_test"], y_test=z["y_test"],
            partitions=[flat[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)],
            init_params=z["init_params"], num_classes=int(z["num_classes"]),
            input_shape=tuple(int(s) for s in z["input_shape"]),
        )


_DATA: SharedData | None = None
_MODEL: LeNet5 | None = None


def _data() -> SharedData:
    """Loaded once per process (each Ray actor reads the .npz once, like apf-ray's zero-copy put)."""
    global _DATA
    if _DATA is None:
        _DATA = load_shared(os.environ[DATA_ENV])
    return _DATA


def _model() -> LeNet5:
    """One model instance per actor process, as apf-ray's ClientHost keeps one; 1 torch thread."""
    global _MODEL
    if _MODEL is None:
        torch.set_num_threads(1)
        _MODEL = _data().model()
    return _MODEL


# --------------------------------------------------------------------------- local training
def local_sgd(model: torch.nn.Module, x: np.ndarray, y: np.ndarray, *, steps: int, batch_size: int,
              lr: float, seed: int) -> float:
    """Plain PyTorch SGD (no momentum, no weight decay) over apf-ray's minibatch schedule.

    Bit-identical to ``apf_ray.training.train_local`` without a mask (``torch.optim.SGD`` on
    CPU tensors does ``p.add_(grad, alpha=-lr)``, as apf-ray's masked step does). Returns the
    mean training loss. Also the loop ``vs_flower.py`` times for the local-compute lower bound.
    """
    torch.manual_seed(seed)  # as apf-ray's ClientHost does before training a client
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    xt = torch.from_numpy(np.ascontiguousarray(x))
    yt = torch.from_numpy(np.ascontiguousarray(y))
    model.train()
    losses = torch.zeros(steps, dtype=torch.float64)
    for step, idx in enumerate(batch_indices(len(x), steps, batch_size, seed)):
        bidx = torch.from_numpy(idx)
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(xt[bidx]), yt[bidx])
        loss.backward()
        optimizer.step()
        losses[step] = loss.detach().to(torch.float64)
    return float(losses.mean())


# --------------------------------------------------------------------------- ClientApp
def client_train(msg, context):
    """The ClientApp's train function (module level, so Ray pickles it by reference)."""
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

    t_start = time.time()
    started = time.perf_counter()
    data, model = _data(), _model()
    config = msg.content["config"]
    pid = int(config["partition-id"])
    idx = data.partitions[pid]
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    loss = local_sgd(model, data.x_train[idx], data.y_train[idx], steps=int(config["local-steps"]),
                     batch_size=int(config["batch-size"]), lr=float(config["lr"]), seed=int(config["seed"]))
    metrics = MetricRecord({"num-examples": len(idx), "train-loss": loss, "partition-id": pid,
                            "t-start": t_start, "compute-s": time.perf_counter() - started})
    return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics}), reply_to=msg)


def make_client_app():
    from flwr.clientapp import ClientApp

    app = ClientApp()
    app.train()(client_train)
    return app


# --------------------------------------------------------------------------- ServerApp
def message_bytes(msg) -> int:
    """What Flower's ``message_size_mod`` logs: the sum of ``count_bytes()`` of the message's records.

    ``ArrayRecord.count_bytes()`` is ``len(Array.data)`` (each tensor serialised with
    ``np.save``: 128-byte .npy header + raw float32 data) plus the length of each key;
    ``ConfigRecord``/``MetricRecord`` count keys plus values (8 bytes per number).
    """
    return sum(record.count_bytes() for record in msg.content.values())


def array_bytes(msg) -> int:
    """Only the ``ArrayRecord``s (what ``arrays_size_mod`` logs)."""
    return sum(record.count_bytes() for record in msg.content.array_records.values())


def make_server_app(spec: dict, out: dict):
    from flwr.app import (
        Array,
        ArrayRecord,
        ConfigRecord,
        Message,
        MessageType,
        MetricRecord,
        RecordDict,
    )
    from flwr.serverapp import ServerApp
    from flwr.serverapp.strategy import FedAvg

    data = _data()
    with np.load(spec["npz"]) as z:
        sampled, seeds = z[f"sample_k{spec['k']}"], z[f"seed_k{spec['k']}"]
    num_clients = len(data.partitions)
    rounds: list[dict] = out["rounds"]

    class ScheduledFedAvg(FedAvg):
        """FedAvg whose round r trains exactly the partitions apf-ray samples in round r."""

        def configure_train(self, server_round, arrays, config, grid):
            rec = {"round": server_round, "t_start": time.time()}
            rounds.append(rec)
            self.global_arrays = arrays
            # Nodes register in another thread once the simulation starts; FedAvg's own sampler
            # waits in steps of 1 s, this polls every 10 ms.
            while len(nodes := sorted(grid.get_node_ids())) < num_clients:
                time.sleep(0.01)
            messages = []
            for pid, seed in zip(sampled[server_round - 1].tolist(), seeds[server_round - 1].tolist(), strict=True):
                cfg = ConfigRecord({"server-round": server_round, "partition-id": pid, "seed": seed,
                                    "local-steps": spec["local_steps"], "batch-size": spec["batch_size"],
                                    "lr": spec["lr"]})
                messages.append(Message(RecordDict({"arrays": arrays, "config": cfg}),
                                        dst_node_id=nodes[pid], message_type=MessageType.TRAIN))
            rec["bytes_down"] = sum(message_bytes(m) for m in messages)
            rec["array_bytes_down"] = sum(array_bytes(m) for m in messages)
            out["last_train_message"] = messages[0]
            return messages

        def aggregate_train(self, server_round, replies):
            replies = list(replies)
            rec = rounds[-1]
            rec["t_replies"] = time.time()
            errors = [m.error.reason for m in replies if m.has_error()]
            if errors:
                raise RuntimeError(f"round {server_round}: {len(errors)} client(s) failed: {errors[0]}")
            metrics = [m.content["metrics"] for m in replies]
            rec["clients"] = sorted(int(m["partition-id"]) for m in metrics)
            if rec["clients"] != sorted(sampled[server_round - 1].tolist()):
                raise RuntimeError(f"round {server_round}: replies from {rec['clients']}, "
                                   f"expected {sampled[server_round - 1].tolist()}")
            rec["bytes_up"] = sum(message_bytes(m) for m in replies)
            rec["array_bytes_up"] = sum(array_bytes(m) for m in replies)
            rec["compute_s"] = [float(m["compute-s"]) for m in metrics]
            rec["client_t_start"] = [float(m["t-start"]) for m in metrics]
            weights = np.array([float(m["num-examples"]) for m in metrics])
            rec["train_loss"] = float((weights * [float(m["train-loss"]) for m in metrics]).sum() / weights.sum())
            out["last_reply"] = replies[0]
            started = time.perf_counter()
            if spec["aggregation"] == "flower":
                result = super().aggregate_train(server_round, replies)
            else:
                result = self.aggregate_like_apf_ray(replies)
            rec["aggregate_s"] = time.perf_counter() - started
            return result

        def aggregate_like_apf_ray(self, replies):
            """FedAvg with apf-ray's arithmetic, so both systems compute bit-identical models.

            Flower's ``aggregate_arrayrecords`` sums ``weight_i / W * x_i`` in float32 in reply
            arrival order (which varies from run to run); apf-ray adds the sample-weighted mean
            of the float32 updates (local - global), accumulated in float64 in client-id order
            (``apf_ray.aggregation.weighted_mean``). Same messages, same validation and metric
            aggregation as ``FedAvg.aggregate_train``; only the averaging arithmetic differs.
            """
            valid, _ = self._check_and_log_replies(replies, is_train=True)
            valid.sort(key=lambda m: int(m.content["metrics"]["partition-id"]))
            names = list(self.global_arrays.keys())
            shapes = [self.global_arrays[n].shape for n in names]
            flat = np.concatenate([self.global_arrays[n].numpy().ravel() for n in names])
            updates = [np.concatenate([m.content["arrays"][n].numpy().ravel() for n in names]) - flat for m in valid]
            weights = [int(m.content["metrics"]["num-examples"]) for m in valid]
            new = flat + weighted_mean(updates, weights)
            ends = np.cumsum([int(np.prod(shape)) for shape in shapes])
            arrays = ArrayRecord({n: Array(np.ascontiguousarray(chunk.reshape(shape)))
                                  for n, shape, chunk in zip(names, shapes, np.split(new, ends[:-1]), strict=True)})
            metrics = self.train_metrics_aggr_fn([m.content for m in valid], self.weighted_by_key)
            return arrays, metrics

    eval_model = data.model()

    def evaluate_fn(server_round: int, arrays):
        if server_round == 0:  # apf-ray does not evaluate the initial model either
            return None
        eval_model.load_state_dict(arrays.to_torch_state_dict())
        acc, loss = evaluate(eval_model, data.x_test, data.y_test, batch_size=512)
        rec = rounds[-1]
        rec.update(test_accuracy=acc, test_loss=loss, t_end=time.time())
        out["final_params"] = get_params(eval_model)
        return MetricRecord({"accuracy": acc, "loss": loss})

    app = ServerApp()

    @app.main()
    def main(grid, context) -> None:
        strategy = ScheduledFedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=num_clients)
        initial = ArrayRecord(data.model().state_dict())
        strategy.start(grid=grid, initial_arrays=initial, num_rounds=spec["rounds"], timeout=3600,
                       evaluate_fn=evaluate_fn)

    return app


# --------------------------------------------------------------------------- entry point
def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    os.environ[DATA_ENV] = str(Path(spec["npz"]).resolve())
    torch.set_num_threads(1)  # the ServerApp thread evaluates with one thread, like apf-ray's server actor
    t_imports = time.time()
    import flwr
    import ray
    from flwr.simulation import run_simulation

    out: dict = {"rounds": [], "t_imports_start": t_imports}
    server_app = make_server_app(spec, out)
    client_app = make_client_app()
    backend_config = {
        # ray.init arguments. address="local": a new cluster; without it ray.init() joins a
        # cluster that `ray start` left on this machine (shared machine).
        "init_args": {"address": "local", "num_cpus": spec["cluster_cpus"], "num_gpus": 0,
                      "object_store_memory": spec["object_store_mb"] * 2**20},
        # options of every ClientAppActor; the pool holds floor(cluster CPUs / num_cpus) actors
        "client_resources": {"num_cpus": spec["actor_cpus"], "num_gpus": 0.0},
    }
    out["t_simulation_start"] = time.time()
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=spec["num_clients"],
                   backend_config=backend_config)
    out["t_simulation_end"] = time.time()

    # Serialized sizes as Ray ships them to/from an actor (cloudpickle of the Message), for reference.
    from ray import cloudpickle

    out["pickled_train_message_bytes"] = len(cloudpickle.dumps(out.pop("last_train_message")))
    out["pickled_reply_message_bytes"] = len(cloudpickle.dumps(out.pop("last_reply")))
    np.save(spec["out_params"], out.pop("final_params"))
    out["versions"] = {"flwr": flwr.__version__, "ray": ray.__version__, "torch": torch.__version__,
                       "numpy": np.__version__, "python": sys.version.split()[0]}
    Path(spec["out"]).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    # Run the module's own copy (``flower_side``), not ``__main__``: cloudpickle pickles
    # functions of ``__main__`` by value with their globals, an importable module by reference.
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import flower_side

    flower_side.main()
