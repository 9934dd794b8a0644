"""Every private Ray API apf-ray uses, in one place, checked against the Ray it was written for.

Ray has no public way to do a few things the project needs (listed below, each with why). Code
in ``actors/``, ``bench/``, ``scripts/`` and ``tests/`` calls these functions instead of reaching
into ``ray._private``, ``ray._raylet`` or a Ray object's underscored attributes, so an upgrade
of Ray has one file to review. They were written against Ray :data:`RAY_WRITTEN_FOR`:

- importing this module with another Ray release warns once (:class:`RayVersionWarning`,
  naming both versions);
- a private name the installed Ray no longer has raises :class:`RayPrivateAPIError`, one line
  naming the name, the installed Ray and :data:`RAY_WRITTEN_FOR` (never a bare AttributeError
  from deep inside Ray).
"""

from __future__ import annotations

import contextlib
import importlib
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import ray

from apf_ray.errors import SetupError

if TYPE_CHECKING:
    from ray._private.worker import RayContext  # noqa: F401  what ray.init() returns; Ray exports no name for it

RAY_WRITTEN_FOR = "2.60"
"""The Ray release (major.minor) whose private APIs this module was written and tested against."""


class RayVersionWarning(UserWarning):
    """The installed Ray is not the release this module's private calls were written against."""


class RayPrivateAPIError(SetupError):
    """A private Ray name this project relies on is missing from the installed Ray: a
    :class:`SetupError`, so the command line prints its one line (``error: ...``, exit 2); most of
    these calls are made while a cluster or run is being set up."""


def version_mismatch(installed: str, written_for: str = RAY_WRITTEN_FOR) -> str | None:
    """Why ``installed`` (a Ray version string) may not have the private APIs used here, or None
    when its major.minor is ``written_for``'s."""
    if installed.split(".")[:2] == written_for.split(".")[:2]:
        return None
    return (f"Ray {installed} is installed, but apf-ray's private Ray calls (actors/ray_private.py) were "
            f"written against Ray {written_for}: they may fail or behave differently; install "
            f"ray=={written_for}.* for a tested combination")


def _missing(what: str) -> RayPrivateAPIError:
    return RayPrivateAPIError(f"Ray {ray.__version__} has no {what}, which apf-ray uses (written against Ray "
                              f"{RAY_WRITTEN_FOR}; install ray=={RAY_WRITTEN_FOR}.* or update actors/ray_private.py)")


def private_module(name: str) -> Any:
    """The private Ray module ``name`` (e.g. ``ray._private.services``); :class:`RayPrivateAPIError`
    if the installed Ray has none."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise _missing(f"module {name}") from None


def private_attr(obj: Any, name: str, owner: str) -> Any:
    """``obj.<name>``, a private attribute of a Ray object or module (``owner`` names it in the
    error); :class:`RayPrivateAPIError` if the installed Ray has none."""
    try:
        return getattr(obj, name)
    except AttributeError:
        raise _missing(f"{owner}.{name}") from None


# --------------------------------------------------------------------------- the driver's Ray


def reload_config() -> None:
    """Make Ray re-read its ``RAY_*`` settings (``RAY_AUTH_MODE`` above all), which it reads once at
    import: ``ray.init()`` does the same reload when it enables token auth; no public call does."""
    raylet = private_module("ray._raylet")
    private_attr(private_attr(raylet, "Config", "ray._raylet"), "initialize", "ray._raylet.Config")("")


@contextlib.contextmanager
def cluster_mode(enabled: bool) -> Iterator[None]:
    """Ray's node-address mode for the ``with`` block, restored after it: ``enabled=False`` keeps
    every server on 127.0.0.1. Ray reads ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` once, at import, into
    ``ray._private.ray_constants.ENABLE_RAY_CLUSTER`` (the only switch for the node IP)."""
    constants = private_module("ray._private.ray_constants")
    saved = private_attr(constants, "ENABLE_RAY_CLUSTER", "ray._private.ray_constants")
    constants.ENABLE_RAY_CLUSTER = enabled
    try:
        yield
    finally:
        constants.ENABLE_RAY_CLUSTER = saved


@contextlib.contextmanager
def lean_local_node(*, forward_worker_output: bool) -> Iterator[None]:
    """A local node started in the ``with`` block runs what a private cluster of fixed nodes uses,
    no more. ``ray.init`` has no options for these (``ray start`` has flags for some); it builds its
    node's parameters from ``ray._private.parameter.RayParams`` (looked up when called), which this
    swaps, for the block, for a subclass with other defaults (an explicit argument still wins):

    - ``dashboard_agent_listen_port=0``: the agent's HTTP server on a free port, not Ray's fixed
      52365; a node whose agent finds it taken (another cluster on this machine: a second command,
      a test's own cluster) retries for ~3.5 s before the node is up, then runs without it.
    - ``no_monitor=True``: no autoscaler monitor process; nothing autoscales a local cluster.
    - ``include_log_monitor=forward_worker_output``: the process that tails the workers' log files
      is what forwards their output to the driver (``log_to_driver``); without that, no one reads it.

    The two processes left out cost ~0.8 s of CPU per start and ~1 s of every stop, which waits
    for them to exit (measured by starting clusters alternately with and without them): a test
    suite starts hundreds. ``tests/test_ray_private.py`` checks which processes a node starts.
    """
    parameter = private_module("ray._private.parameter")
    params = private_attr(parameter, "RayParams", "ray._private.parameter")

    class LeanLocalNode(params):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("dashboard_agent_listen_port", 0)
            kwargs.setdefault("no_monitor", True)
            kwargs.setdefault("include_log_monitor", forward_worker_output)
            super().__init__(*args, **kwargs)

    parameter.RayParams = LeanLocalNode
    try:
        yield
    finally:
        parameter.RayParams = params


def detected_cpus_and_gpus() -> tuple[float, float]:
    """(CPUs, GPUs) a local node started now would offer, by Ray's own detection (cgroup limits
    included), before starting one. GPUs are 0 when detection fails (Ray would see none either)."""
    utils = private_module("ray._private.utils")
    accelerators = private_module("ray._private.accelerators")
    cpus = float(private_attr(utils, "get_num_cpus", "ray._private.utils")())
    manager_for = private_attr(accelerators, "get_accelerator_manager_for_resource", "ray._private.accelerators")
    try:
        gpus = float(manager_for("GPU").get_current_node_num_accelerators())
    except Exception:  # detection failing means Ray will not see a GPU either
        gpus = 0.0
    return cpus, gpus


def bootstrap_endpoint(address: str) -> str | None:
    """``HOST:PORT`` that ``ray.init(address)`` will dial for a cluster address (``auto`` looked up
    in the session files, a loopback host rewritten unless loopback-only), or None if Ray finds none."""
    services = private_module("ray._private.services")
    return private_attr(services, "canonicalize_bootstrap_address", "ray._private.services")(address)


def object_store_summary(address: str) -> str:
    """Ray's text summary of the cluster's object store (``ray memory --stats-only``), for benchmarks."""
    internal = private_module("ray._private.internal_api")
    return private_attr(internal, "memory_summary", "ray._private.internal_api")(address=address, stats_only=True)


LOOPBACK_NODE_START = """\
import sys
import ray._private.services as services
services.resolve_ip_for_localhost = lambda host: host
from ray.scripts.scripts import main
sys.argv[0] = "ray"
sys.exit(main())
"""
"""A stand-alone ``ray start`` for a second node of a loopback-only cluster, run on that node
(``scripts/ray_up_local.py``): keeps ``--address``/``--node-ip-address`` 127.0.0.1 as given. With
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` ``ray start --address`` refuses to join; without it Ray
rewrites 127.0.0.1 to the machine's address (``ray._private.services.resolve_ip_for_localhost``)."""


def checked_cluster_config(config: dict[str, Any]) -> dict[str, Any]:
    """A ``ray up`` cluster file's mapping filled with Ray's defaults and validated against Ray's
    schema, as ``ray up`` does before it starts anything (Ray's ``ValidationError`` if invalid)."""
    util = private_module("ray.autoscaler._private.util")
    prepared = private_attr(util, "prepare_config", "ray.autoscaler._private.util")(config)
    private_attr(util, "validate_config", "ray.autoscaler._private.util")(prepared)
    return prepared


# --------------------------------------------------------------------------- Tune's PBT


def pbt_synchronous(scheduler: Any) -> bool:
    """Whether a ``PopulationBasedTraining`` perturbs its population at once (``synch=True``): Ray
    keeps the flag only in ``_synch``."""
    return bool(private_attr(scheduler, "_synch", "PopulationBasedTraining"))


def pbt_forget(scheduler: Any, trial: Any) -> None:
    """Drop ``trial``'s last score from a ``PopulationBasedTraining`` (``_trial_state``), so an errored
    trial is never chosen as a donor; Ray has no public call for it."""
    private_attr(scheduler, "_trial_state", "PopulationBasedTraining").pop(trial, None)


def warn_if_other_ray(installed: str = ray.__version__) -> None:
    """Warn (:class:`RayVersionWarning`) when the ``installed`` Ray is not :data:`RAY_WRITTEN_FOR`;
    called once, when this module is imported."""
    why = version_mismatch(installed)
    if why is not None:
        warnings.warn(why, RayVersionWarning, stacklevel=2)


warn_if_other_ray()
