"""Partitioners: split a training set's sample indices among federated clients.

Modelled on Flower Datasets: a partitioner takes its parameters and seed in the
constructor, so the same object always produces the same split, and
``partition(labels, groups)`` returns one sorted int64 index array per client. Every
sample goes to at most one client; ``iid``, ``shards`` and ``dirichlet`` assign every
sample exactly once, ``natural`` drops the groups it has no client for.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod

import numpy as np

from apf_ray.plugins import resolve, subclass_of


def _indices_by_owner(owner: np.ndarray, num_clients: int) -> list[np.ndarray]:
    """One ascending int64 index array per client from a per-sample owner id (-1 = nobody)."""
    order = np.argsort(owner, kind="stable")  # stable: indices stay ascending within a client
    counts = np.bincount(owner[owner >= 0], minlength=num_clients)
    assigned = order[len(owner) - counts.sum():]
    return [part.astype(np.int64) for part in np.split(assigned, np.cumsum(counts)[:-1])]


def _grouped_by_label(labels: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Sample indices ordered by label, shuffled within each label, and the count per present label."""
    shuffled = rng.permutation(len(labels))
    order = shuffled[np.argsort(labels[shuffled], kind="stable")]
    _, counts = np.unique(labels, return_counts=True)
    return order, counts


class Partitioner(ABC):
    """Base class: validates the inputs and turns the subclass's owner ids into index arrays."""

    def __init__(self, num_clients: int, *, seed: int = 0) -> None:
        if int(num_clients) != num_clients or num_clients < 1:
            raise ValueError(f"num_clients={num_clients} must be a positive integer")
        self.num_clients = int(num_clients)
        self.seed = seed

    def partition(self, labels: np.ndarray, groups: np.ndarray | None = None) -> list[np.ndarray]:
        """Indices of each client's training samples (``num_clients`` sorted int64 arrays)."""
        labels = np.asarray(labels)
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(
                f"labels must be a 1-D integer array, got {labels.dtype} of shape {labels.shape}"
            )
        if labels.size and labels.min() < 0:
            raise ValueError(f"labels must be >= 0, found {labels.min()}")
        if groups is not None:
            groups = np.asarray(groups)
            if groups.shape != labels.shape or not np.issubdtype(groups.dtype, np.integer):
                raise ValueError(
                    f"groups must be integer ids, one per sample: got {groups.dtype} of shape "
                    f"{groups.shape} for {labels.shape[0]} labels"
                )
        owner = self._owners(labels, groups, np.random.default_rng(self.seed))
        return _indices_by_owner(owner, self.num_clients)

    @abstractmethod
    def _owners(self, labels: np.ndarray, groups: np.ndarray | None, rng: np.random.Generator) -> np.ndarray:
        """The client id of every sample (-1 for a sample no client gets)."""


class IidPartitioner(Partitioner):
    """Shuffle, then cut into ``num_clients`` parts whose sizes differ by at most one."""

    def _owners(self, labels: np.ndarray, groups: np.ndarray | None, rng: np.random.Generator) -> np.ndarray:
        n = len(labels)
        if n < self.num_clients:
            raise ValueError(f"iid: {n} samples cannot fill num_clients={self.num_clients} clients")
        owner = np.empty(n, dtype=np.int64)
        owner[rng.permutation(n)] = np.arange(n) * self.num_clients // n
        return owner


class ShardPartitioner(Partitioner):
    """Label shards, the "extremely non-IID" split of McMahan et al.

    The samples are cut into ``num_clients * shards_per_client`` shards that each hold a
    single label (every present label gets one shard, the remaining shards are shared in
    proportion to the label counts by largest remainder; balanced labels thus get equal
    shards), and each client receives ``shards_per_client`` random shards, so a client sees
    at most ``shards_per_client`` labels (default 2: one or two classes per client).
    """

    def __init__(self, num_clients: int, *, shards_per_client: int = 2, seed: int = 0) -> None:
        super().__init__(num_clients, seed=seed)
        if int(shards_per_client) != shards_per_client or shards_per_client < 1:
            raise ValueError(f"shards_per_client={shards_per_client} must be a positive integer")
        self.shards_per_client = int(shards_per_client)

    def _owners(self, labels: np.ndarray, groups: np.ndarray | None, rng: np.random.Generator) -> np.ndarray:
        order, class_sizes = _grouped_by_label(labels, rng)
        num_shards = self.num_clients * self.shards_per_client
        if num_shards > len(labels):
            raise ValueError(
                f"shards: {num_shards} shards (num_clients*shards_per_client) "
                f"exceed the {len(labels)} samples"
            )
        if num_shards < len(class_sizes):
            raise ValueError(
                f"shards: {num_shards} shards (num_clients*shards_per_client) cannot give each of the "
                f"{len(class_sizes)} labels present its own shard; raise num_clients or shards_per_client"
            )
        # One shard per label, the rest by largest remainder in proportion to the label's count.
        quota = (num_shards - len(class_sizes)) * class_sizes / len(labels)
        shards_per_label = 1 + np.floor(quota).astype(np.int64)
        leftover = num_shards - shards_per_label.sum()
        shards_per_label[np.argsort(np.floor(quota) - quota, kind="stable")[:leftover]] += 1

        # Shards are consecutive runs of `order`; the shards of one label split its run near-equally.
        label_of_shard = np.repeat(np.arange(len(class_sizes)), shards_per_label)
        first_shard = np.cumsum(shards_per_label) - shards_per_label
        rank_in_label = np.arange(num_shards) - np.repeat(first_shard, shards_per_label)
        size, count = class_sizes[label_of_shard], shards_per_label[label_of_shard]
        shard_sizes = (rank_in_label + 1) * size // count - rank_in_label * size // count

        client_of_shard = np.empty(num_shards, dtype=np.int64)
        client_of_shard[rng.permutation(num_shards)] = np.arange(num_shards) // self.shards_per_client
        owner = np.empty(len(labels), dtype=np.int64)
        owner[order] = np.repeat(client_of_shard, shard_sizes)
        empty = np.setdiff1d(np.arange(self.num_clients), owner)
        if empty.size:
            raise ValueError(f"shards: clients {empty.tolist()} got only empty shards; use fewer shards")
        return owner


class DirichletPartitioner(Partitioner):
    """Per-label Dirichlet(beta) proportions over clients (Hsu et al. 2019, as in Flower Datasets).

    Smaller ``beta`` means more skew (beta -> 0: each label on few clients; large beta:
    close to IID). The draw is repeated, up to ``max_retries`` times, until every client
    holds at least ``min_size`` samples.
    """

    def __init__(
        self,
        num_clients: int,
        *,
        beta: float = 0.5,
        min_size: int = 10,
        max_retries: int = 100,
        seed: int = 0,
    ) -> None:
        super().__init__(num_clients, seed=seed)
        if not beta > 0:
            raise ValueError(f"beta={beta} must be > 0")
        if min_size < 0 or max_retries < 1:
            raise ValueError(f"min_size={min_size} must be >= 0 and max_retries={max_retries} >= 1")
        self.beta = float(beta)
        self.min_size = int(min_size)
        self.max_retries = int(max_retries)

    def _owners(self, labels: np.ndarray, groups: np.ndarray | None, rng: np.random.Generator) -> np.ndarray:
        if self.min_size * self.num_clients > len(labels):
            raise ValueError(
                f"dirichlet: {self.num_clients} clients x min_size={self.min_size} "
                f"exceed the {len(labels)} samples"
            )
        order, class_sizes = _grouped_by_label(labels, rng)
        for _ in range(self.max_retries):
            proportions = rng.dirichlet(np.full(self.num_clients, self.beta), size=len(class_sizes))
            cuts = np.floor(np.cumsum(proportions, axis=1) * class_sizes[:, None]).astype(np.int64)
            cuts[:, -1] = class_sizes  # absorb the float rounding of the cumulative sum
            per_label = np.diff(cuts, axis=1, prepend=0)  # (labels, clients) sample counts
            if per_label.sum(axis=0).min() >= self.min_size:
                owner = np.empty(len(labels), dtype=np.int64)
                client_of_cell = np.tile(np.arange(self.num_clients), len(class_sizes))
                owner[order] = np.repeat(client_of_cell, per_label.ravel())
                return owner
        raise ValueError(
            f"dirichlet: no draw in max_retries={self.max_retries} gave every one of {self.num_clients} "
            f"clients min_size={self.min_size} samples at beta={self.beta}; raise beta or lower min_size"
        )


class NaturalPartitioner(Partitioner):
    """One client per natural group (e.g. a Shakespeare role, a writer), LEAF style.

    With fewer clients than groups, the ``num_clients`` largest groups (ties: lower id) are
    kept and the other groups' samples go to nobody; client order follows group id. More
    clients than groups is an error. The split is deterministic: ``seed`` is unused.
    """

    def _owners(self, labels: np.ndarray, groups: np.ndarray | None, rng: np.random.Generator) -> np.ndarray:
        if groups is None:
            raise ValueError(
                "natural: the dataset has no natural groups (Dataset.groups is None); "
                "use iid, shards or dirichlet"
            )
        ids, group_of_sample, sizes = np.unique(groups, return_inverse=True, return_counts=True)
        if self.num_clients > len(ids):
            raise ValueError(f"natural: num_clients={self.num_clients} exceeds the {len(ids)} natural groups")
        kept = np.sort(np.lexsort((np.arange(len(ids)), -sizes))[: self.num_clients])
        client_of_group = np.full(len(ids), -1, dtype=np.int64)
        client_of_group[kept] = np.arange(self.num_clients)
        return client_of_group[group_of_sample]


PARTITIONERS: dict[str, type[Partitioner]] = {
    "iid": IidPartitioner,
    "shards": ShardPartitioner,
    "dirichlet": DirichletPartitioner,
    "natural": NaturalPartitioner,
}


def make_partitioner(name: str, num_clients: int, **options: object) -> Partitioner:
    """Build the partitioner registered as ``name`` (or the user's :class:`Partitioner`
    subclass at import path ``package.module:Class``); ``options`` are its constructor's
    keywords (e.g. ``beta``, ``seed``)."""
    cls = resolve(name, PARTITIONERS, "partitioner", check=subclass_of(Partitioner),
                  expected="a Partitioner subclass")
    signature = inspect.signature(cls)
    try:
        signature.bind(num_clients, **options)
    except TypeError as err:
        accepted = sorted(set(signature.parameters) - {"num_clients"})
        raise ValueError(f"partitioner {name!r}: {err}; accepted options: {accepted}") from None
    return cls(num_clients, **options)


def label_histogram(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> np.ndarray:
    """Samples per (client, label): an int64 array of shape (len(parts), num_classes)."""
    client = np.repeat(np.arange(len(parts)), [len(part) for part in parts])
    indices = np.concatenate([np.asarray(part, dtype=np.int64) for part in parts] or [np.empty(0, np.int64)])
    label = np.asarray(labels)[indices]
    counts = np.bincount(client * num_classes + label, minlength=len(parts) * num_classes)
    return counts.reshape(len(parts), num_classes)
