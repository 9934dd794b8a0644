"""Client pools: actor placement per hardware group, elastic sizing, deadline-bound dispatch."""

from __future__ import annotations

import contextlib
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import ray
from ray.exceptions import RayActorError, RayError

from actors.client import ClientPoolActor
from apf_ray.aggregation import Partial
from apf_ray.client_store import ClientStateStore, StoreLocation
from apf_ray.config import ExperimentConfig, PoolConfig
from apf_ray.edge import edge_groups
from apf_ray.engine import ClientCall, ClientExecutor
from apf_ray.placement import plan_pool_sizes, pool_request
from apf_ray.records import Broadcast, ClientResult


def alive_node_resources() -> list[dict[str, float]]:
    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


def capacity() -> list[dict[str, float]]:
    """Where client actors may go: the bundles of the placement group this code runs in (a Tune
    trial's, which captures child actors), else every alive node of the cluster."""
    group = ray.util.get_current_placement_group()
    if group is not None:
        return [dict(b) for b in group.bundle_specs]
    return alive_node_resources()


def _kill(handle: ray.actor.ActorHandle) -> None:
    with contextlib.suppress(RayError):  # already dead is fine
        ray.kill(handle, no_restart=True)


@dataclass
class _Member:
    handle: ray.actor.ActorHandle
    ready_ref: ray.ObjectRef
    ready: bool = False
    created: float = field(default_factory=time.monotonic)
    sees_store: bool = True  # reads the run's client-state folder (else states are shipped with its calls)


@dataclass(eq=False)
class _Share:
    """One actor's part of a round: its streaming call, its clients not yet back (in order), what came back."""

    pool: str
    member: _Member
    stream: ray.ObjectRefGenerator
    waiting: deque[int]
    error: str | None = None  # the last failure the stream gave, for clients it never reached
    results: list[ClientResult] = field(default_factory=list)
    partial: Partial | None = None  # aggregation on the way in: the share's sums, its last item
    lost: str | None = None  # why its partial will never come: died, timeout


class ClientPools(ClientExecutor):
    """All client actors of a run, grouped by pool; replaces dead ones, grows with the cluster.

    The executor of the Ray server actor's round engine: any actor of a client's pool can
    train it, since its strategy state is in the run's store (``store``), which the actor reads
    by path; an actor that cannot see it (another node, no shared filesystem) gets the states
    of its clients shipped with the call instead.
    """

    def __init__(self, cfg: ExperimentConfig, pool_of_client: list[str], partitions: list[np.ndarray],
                 dataset_ref: ray.ObjectRef, store: StoreLocation) -> None:
        self.cfg = cfg
        self.store = ClientStateStore(store)
        self.pools = {p.name: p for p in cfg.cluster.pools}
        self.pool_of_client = pool_of_client
        self.cfg_dict = cfg.to_dict()
        self.dataset_ref = dataset_ref  # one object-store copy shared by every actor
        self.partition_refs = {
            name: ray.put({i: partitions[i] for i, p in enumerate(pool_of_client) if p == name})
            for name in self.pools
        }
        self.members: dict[str, list[_Member]] = {name: [] for name in self.pools}
        self.events: list[str] = []

    # ---- membership --------------------------------------------------------------------
    def _spawn(self, pool: PoolConfig) -> _Member:
        opts = {"num_cpus": pool.num_cpus, "num_gpus": pool.num_gpus, "max_restarts": 0}
        if pool.resources:
            opts["resources"] = dict(pool.resources)
        handle = ClientPoolActor.options(**opts).remote(self.cfg_dict, pool.name, self.dataset_ref)
        ready = handle.add_clients.remote(self.partition_refs[pool.name], self.store.location)
        return _Member(handle, ready)

    def _mark_started(self, pool: str) -> None:
        """Members whose start-up finished become ready; failed start-ups are dropped."""
        for m in [m for m in self.members[pool] if not m.ready]:
            if ray.wait([m.ready_ref], timeout=0)[0]:
                try:
                    m.sees_store = ray.get(m.ready_ref, timeout=self.cfg.cluster.result_timeout_s)
                    m.ready = True
                except RayError as err:
                    self._drop(pool, m, f"start-up failed: {type(err).__name__}")

    def refresh(self) -> None:
        """Mark finished start-ups ready and bring each pool up to its target size."""
        targets = plan_pool_sizes(list(self.pools.values()), capacity())
        for name, pool in self.pools.items():
            self._mark_started(name)
            target = targets[name]
            missing = target - len(self.members[name])
            for _ in range(max(0, missing)):
                self.members[name].append(self._spawn(pool))
            if missing > 0:
                self.events.append(f"pool {name}: +{missing} actor(s) (target {target})")

    def _drop(self, pool: str, member: _Member, why: str) -> None:
        if member in self.members[pool]:
            self.members[pool].remove(member)
            self.events.append(f"pool {pool}: actor dropped ({why})")
            _kill(member.handle)

    def ready_members(self, pool: str) -> list[_Member]:
        return [m for m in self.members[pool] if m.ready]

    def wait_ready(self, pools: set[str], timeout_s: float, *, every_actor: bool = False,
                   limit_s: float | None = None) -> None:
        """Block (bounded) until each named pool has a ready actor (all of them: ``every_actor``).

        Only actors still inside their start-up window (``timeout_s`` since spawn) are waited
        for, so a pool whose actors cannot be placed (no node with its resources) costs a
        round nothing; its clients are dropped as ``no_actor`` until such a node joins. The
        whole wait lasts at most ``limit_s`` seconds (default ``cluster.round_timeout_s``).
        """
        deadline = time.monotonic() + (self.cfg.cluster.round_timeout_s if limit_s is None else limit_s)
        while True:
            self.refresh()
            now = time.monotonic()
            refs = [
                m.ready_ref
                for p in pools
                if every_actor or not self.ready_members(p)
                for m in self.members[p]
                if not m.ready and now - m.created < timeout_s
            ]
            if not refs or now >= deadline:
                return
            ray.wait(refs, num_returns=1, timeout=min(1.0, deadline - now))

    def startup_status(self) -> dict[str, dict]:
        """Per pool: its actors ``ready``, all its ``actors`` (ready, starting or waiting for
        resources), and the ``request`` of one, for the driver's start-up wait."""
        return {name: {"ready": len(self.ready_members(name)), "actors": len(self.members[name]),
                       "request": pool_request(pool)} for name, pool in self.pools.items()}

    def describe(self) -> dict[str, list[dict]]:
        out = {}
        for name in self.pools:
            infos = []
            for m in self.ready_members(name):
                try:
                    infos.append(ray.get(m.handle.info.remote(), timeout=self.cfg.cluster.result_timeout_s))
                except RayError as err:
                    infos.append({"error": type(err).__name__})
            out[name] = infos
        return out

    # ---- a round ------------------------------------------------------------------------
    def take_events(self) -> list[str]:
        events, self.events = self.events, []
        return events

    def execute(self, broadcast: Broadcast,
                calls: list[ClientCall]) -> tuple[list[ClientResult], dict[int, str], list[Partial]]:
        """Run ``calls`` on their pools; whatever is not back by ``cluster.round_timeout_s`` is dropped.

        Each ready actor of a pool gets every n-th of the pool's clients (balanced: shares differ
        by at most one; :func:`apf_ray.edge.edge_groups`) in one streaming call
        (``ClientPoolActor.train``), and results are taken as they arrive. A client whose result
        fails to arrive is an error result; an actor that dies costs its clients not yet back
        (``died``) and is replaced by the next ``refresh``; at the deadline the clients not back
        are ``timeout`` and their actors skip the rest. Under aggregation on the way in
        (``broadcast.edge_bounds``) each actor's last item is its share's partial, which holds
        the sums of all its valid clients: a share whose partial does not arrive (its actor
        died, or its share was not done by the deadline) loses those clients too (``died``,
        ``timeout``), since their updates never reached the server. Partials are returned in
        share order (pools in config order, actors in pool order).
        """
        needed = {self.pool_of_client[c] for c, _ in calls}
        self.wait_ready(needed, self.cfg.cluster.startup_timeout_s)
        bref = ray.put(broadcast)  # once per round; every actor's call gets the reference
        ready = {pool: self.ready_members(pool) for pool in self.pools}
        missing: dict[int, str] = {}
        shares: list[_Share] = []
        taken = dict.fromkeys(self.pools, 0)  # actors of each pool given a share so far
        for pool, share in edge_groups(calls, self.pool_of_client, list(self.pools),
                                       {p: len(m) for p, m in ready.items()}):
            if not ready[pool]:
                missing.update(dict.fromkeys((c for c, _ in share), "no_actor"))
                continue
            member = ready[pool][taken[pool]]
            taken[pool] += 1
            if not member.sees_store:
                share = self.store.ship(share)
            stream = member.handle.train.remote(bref, share)
            shares.append(_Share(pool, member, stream, deque(c for c, _ in share)))
        live = {id(s.stream): s for s in shares}
        self._drain(live, missing, time.monotonic() + self.cfg.cluster.round_timeout_s)
        for share in live.values():
            missing.update(dict.fromkeys(share.waiting, "timeout"))
            share.lost = "timeout"
            share.member.handle.cancel_round.remote(broadcast.round)
        streamed = broadcast.edge_bounds is not None
        partials = []
        for share in shares:
            if share.partial is not None:
                partials.append(share.partial)
            elif streamed:  # its valid uploads' sums never came: they did not reach the server
                missing.update({r.client_id: share.lost or "error" for r in share.results
                                if r.verdict is not None and r.verdict.status == "ok"})
        results = [r for share in shares for r in share.results if r.client_id not in missing]
        return results, missing, partials

    def _drain(self, live: dict[int, _Share], missing: dict[int, str], deadline: float) -> None:
        """Take the ``live`` shares' items until each stream ends or ``deadline`` (monotonic s) passes."""
        while live:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            done, _ = ray.wait([s.stream for s in live.values()], num_returns=1, timeout=left)
            for stream in done:
                share = live[id(stream)]
                if not self._take(share, missing):
                    del live[id(stream)]

    def _take(self, share: _Share, missing: dict[int, str]) -> bool:
        """Take the next item of an actor's stream; False once it has nothing more to give."""
        try:
            ref = next(share.stream)
        except StopIteration:  # ended early: its last error (or none) stands for the rest
            detail = share.error or "the actor's call ended before this client trained"
            share.results.extend(ClientResult(cid, None, error=detail) for cid in share.waiting)
            share.waiting.clear()
            return False
        try:
            item = ray.get(ref, timeout=self.cfg.cluster.result_timeout_s)
        except RayActorError:
            missing.update(dict.fromkeys(share.waiting, "died"))
            share.waiting.clear()
            share.lost = "died"
            self._drop(share.pool, share.member, "actor died")
            return False
        except RayError as err:  # the call itself failed: an error result, not a crash
            share.error = f"{type(err).__name__}: {err}"[: self.cfg.cluster.max_error_chars]
            if share.waiting:
                share.results.append(ClientResult(share.waiting.popleft(), None, error=share.error))
            return True  # what follows (a client, its partial) or the stream's end tells
        if isinstance(item, Partial):
            share.partial = item
            return False  # the stream's last item, after its every client
        share.waiting.remove(item.client_id)
        share.results.append(item)
        return bool(share.waiting) or item.verdict is not None  # a verdict: the partial follows

    def shutdown(self) -> None:
        for members in self.members.values():
            for m in members:
                _kill(m.handle)
        self.members = {name: [] for name in self.pools}
