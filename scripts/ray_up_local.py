#!/usr/bin/env python3
"""`ray up` the project's cluster.yaml on this machine, run a short `apf-ray tune` on it as a Ray
job, and take everything down again — on a shared machine, without touching anyone else's Ray.

    sudo PYTHONPATH=$PWD python3 scripts/ray_up_local.py [--with-worker]

Needs root, this Python with Ray 2.60 and apf-ray's dependencies, and
`apt-get install openssh-server rsync netcat-openbsd` (`unshare` comes with util-linux).

What it does, all on 127.0.0.1 (undone in `finally`, also when a step fails):

1. starts a *canary*: a `ray start --head --block` node of its own, outside everything below;
2. writes a throw-away client key, host key and sshd_config to a temp dir T and runs sshd on a
   free 127.0.0.1 port inside `unshare --pid --fork --mount-proc` (a PID namespace of its own,
   with a private tmpfs on /tmp/ray); ssh sessions get HOME=T/home;
3. writes T/cluster.yaml: the project's cluster.yaml with head_ip 127.0.0.1, ssh tunnelled
   through `nc` to that port (Ray's ssh has no port option), start commands WITHOUT `ray stop`,
   a loopback-only head on free ports (docs/CLUSTER.md, "Loopback-only clusters") and an import
   check instead of `pip install -e` (this machine's Python is shared);
4. `RAY_UP_enable_autoscaler_v2=0 ray up`, then a blocking `ray job submit` of `apf-ray tune`
   (a tiny grid search from T/job, synced to the head as ~/apf-ray-job) to the head's dashboard,
   and a check that the head's processes listen on 127.0.0.1 only;
5. `ray down`: its hard-coded `ray stop` runs on the head over ssh, i.e. inside the namespace,
   where /proc shows only the namespace's processes; then sshd is stopped (it is PID 1 of the
   namespace, so the kernel kills whatever is left in it), the canary must still be alive, and
   T plus ray up's client-side files (/tmp/ray/cluster-NAME.*, /tmp/ray-config-*, the ssh
   ControlPath dir) are removed.

It prints PASS/FAIL lines and exits 0 only if all pass. It never runs `ray stop` on this host.
`--with-worker` adds a worker node (the "CPU edge" kind of cluster.yaml) on the same machine,
launched by the head's autoscaler over ssh as `localhost`.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import getpass
import hashlib
import ipaddress
import json
import os
import re
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import yaml

from actors.ray_private import LOOPBACK_NODE_START  # `ray start` keeping 127.0.0.1 (a private Ray API)

REPO = Path(__file__).resolve().parent.parent
SSHD = "/usr/sbin/sshd"
INSTALL_HINT = "apt-get install -y openssh-server rsync netcat-openbsd util-linux"
T0 = time.monotonic()

# The environment of every process of a loopback-only cluster (docs/CLUSTER.md): node IP
# 127.0.0.1 that Ray no longer rewrites, so every server binds 127.0.0.1; no Prometheus exporter;
# free ports for the autoscaler/dashboard metrics servers; explicit token auth.
LOOPBACK_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_enable_metrics_collection": "0",
    "AUTOSCALER_METRIC_PORT": "0",
    "DASHBOARD_METRIC_PORT": "0",
    "RAY_AUTH_MODE": "token",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
}
# ray up / exec / down: autoscaler v1 (v2 never launched the local provider's workers in our check)
UP_ENV = {"RAY_UP_enable_autoscaler_v2": "0", "RAY_USAGE_STATS_ENABLED": "0", "TERM": "dumb"}
RAY_PROCESS_NAMES = {"raylet", "gcs_server", "monitor.py", "dashboard.py", "log_monitor.py", "agent.py",
                     "runtime_env_agent.py", "main.py", "default_worker.py", "setup_worker.py"}
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\r")

# The live nodes with `edge_cpu`, from the GCS (`ray status` keys nodes by IP, and here both are 127.0.0.1).
EDGE_NODES = """\
import ray
ray.init(address="127.0.0.1:{gcs}", logging_level="ERROR")
print("EDGE_NODES", sum(1 for n in ray.nodes() if n["Alive"] and n["Resources"].get("edge_cpu")))
"""


# --------------------------------------------------------------------------------------------
# output and subprocesses


def log(message: str) -> None:
    print(f"[{time.monotonic() - T0:6.1f}s] {message}", flush=True)


def verdict(ok: bool, what: str, results: list[tuple[bool, str]]) -> None:
    results.append((ok, what))
    log(f"{'PASS' if ok else 'FAIL'} {what}")


def _die_with_parent() -> None:
    """In a child: SIGTERM when this script dies, so nothing it started outlives it."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _kill_group(process: subprocess.Popen, grace_s: float = 10) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=grace_s)
            return
        except subprocess.TimeoutExpired:
            continue


def run(cmd: list[str], *, timeout: float, env: dict[str, str] | None = None, check: bool = True,
        show: Callable[[str], bool] | None = None) -> tuple[int, list[str]]:
    """Run ``cmd`` in its own process group with a timeout; stream its output, indented.

    ``show`` picks the lines printed as they come (default: all); a failing command also prints
    the rest of its last 40 lines. The whole group is killed on timeout or interrupt.
    """
    log("$ " + shlex.join(cmd))
    started = time.monotonic()
    process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, errors="replace",
                               env={**os.environ, **(env or {})}, start_new_session=True,
                               preexec_fn=_die_with_parent)
    lines: list[str] = []
    printed: set[int] = set()

    def read() -> None:
        assert process.stdout is not None
        for raw in process.stdout:
            line = ANSI.sub("", raw.rstrip("\n")).rstrip()
            lines.append(line)
            if line and (show is None or show(line)):
                printed.add(len(lines) - 1)
                print("    " + line, flush=True)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        rc = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(process)
        reader.join(timeout=5)
        log(f"  -> TIMEOUT after {timeout:.0f}s; last lines:")
        for line in lines[-40:]:
            print("    " + line, flush=True)
        raise
    except BaseException:  # KeyboardInterrupt, SystemExit from the SIGTERM handler
        _kill_group(process)
        raise
    reader.join(timeout=10)
    if rc != 0:  # the end of the output, whatever was left out
        for i, line in enumerate(lines[-40:], start=len(lines) - min(40, len(lines))):
            if line and i not in printed:
                print("    " + line, flush=True)
    log(f"  -> rc={rc} in {time.monotonic() - started:.1f}s")
    if check and rc != 0:
        raise RuntimeError(f"command failed with exit code {rc}: {shlex.join(cmd)}")
    return rc, lines


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout_s:.0f}s") from None
            time.sleep(0.5)


# --------------------------------------------------------------------------------------------
# processes and listening sockets, straight from /proc


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text(errors="replace")
            except OSError:
                continue
            ppid = int(stat[stat.rfind(")") + 2 :].split()[1])  # "pid (comm) state ppid ..."
            children.setdefault(ppid, []).append(int(entry))
    return children


def _all_pids() -> list[int]:
    return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]


def descendants(pid: int) -> set[int]:
    children, out, stack = _children_map(), set(), [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in out:
                out.add(child)
                stack.append(child)
    return out


def process_name(pid: int) -> str:
    """``raylet``, ``gcs_server``, ``agent.py``, ``ray::IDLE``, ... (argv, as Ray renames workers)."""
    try:
        argv = [a.decode(errors="replace") for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
    except OSError:
        return "?"
    if not argv:
        return "?"
    if argv[0].startswith("ray::"):
        return argv[0].split()[0]
    return next((os.path.basename(a) for a in argv[:3] if a.endswith(".py")), os.path.basename(argv[0]))


def _listen_table(pid: int) -> dict[int, tuple[str, int]]:
    """socket inode -> (address, port) of the TCP sockets in LISTEN state in ``pid``'s network namespace."""
    table: dict[int, tuple[str, int]] = {}
    for name, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        try:
            rows = Path(f"/proc/{pid}/net/{name}").read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if len(cols) < 10 or cols[3] != "0A":
                continue
            hex_addr, hex_port = cols[1].split(":")
            raw = bytes.fromhex(hex_addr)
            if family == socket.AF_INET:
                addr = socket.inet_ntop(family, raw[::-1])
            else:  # four host-order 32-bit words
                addr = socket.inet_ntop(family, struct.pack(">4I", *struct.unpack("<4I", raw)))
            table[int(cols[9])] = (addr, int(hex_port, 16))
    return table


def listening_sockets(pids: Iterable[int]) -> list[tuple[int, str, str, int]]:
    """(pid, process, address, port) of every listening TCP socket the processes hold."""
    out, tables = [], {}
    for pid in sorted(set(pids)):
        try:
            netns = os.readlink(f"/proc/{pid}/ns/net")
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        table = tables.setdefault(netns, _listen_table(pid))
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:[") and int(target[8:-1]) in table:
                out.append((pid, process_name(pid), *table[int(target[8:-1])]))
    return sorted(out, key=lambda s: (s[1], s[3]))


def is_loopback(addr: str) -> bool:
    ip = ipaddress.ip_address(addr)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


# --------------------------------------------------------------------------------------------
# the canary, the private sshd, the cluster yaml, the job


class Canary:
    """A loopback `ray start --head --block` node in its own process group; `ray down` must spare it."""

    def __init__(self, root: Path) -> None:
        self.root = root / "canary"
        self.root.mkdir()
        self.log_path = self.root / "ray_start.log"
        self.process: subprocess.Popen | None = None

    def start(self, timeout_s: float = 180) -> None:
        args = ["ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={free_port()}",
                f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
                "--include-dashboard=false", f"--temp-dir={self.root}", "--num-cpus=0",
                f"--object-store-memory={80 * 2**20}", "--disable-usage-stats", "--log-style=record"]
        with open(self.log_path, "w") as out:
            self.process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT,
                                            env={**os.environ, **LOOPBACK_ENV}, start_new_session=True,
                                            preexec_fn=_die_with_parent)
        deadline = time.monotonic() + timeout_s
        while "Ray runtime started." not in self.log_path.read_text(errors="replace"):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("canary `ray start` did not come up:\n" + self.log_path.read_text(errors="replace"))
            time.sleep(0.5)
        log(f"canary Ray node up outside the namespace (pid {self.process.pid})")

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        if self.process is not None:
            _kill_group(self.process, grace_s=30)


class PrivateSshd:
    """sshd on a free 127.0.0.1 port, PID 1 of its own PID + mount namespace; sessions get HOME=T/home."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.home = root / "home"
        self.key = root / "id_ed25519"
        self.process: subprocess.Popen | None = None
        self.pid_namespace: str | None = None  # e.g. "pid:[4026532512]"
        self.made_run_sshd = False

    def start(self) -> None:
        (self.home / ".ray").mkdir(parents=True)
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "apf-ray-up-local", "-f", str(self.key)], timeout=30)
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.root / "host_key")], timeout=30)
        shutil.copy(f"{self.key}.pub", self.root / "authorized_keys")
        # Every session (ray up's commands, ray exec, the head's processes): this Python's bin dir
        # first on PATH, and the loopback-only cluster environment.
        path = f"{Path(sys.executable).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}"
        exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in {"PATH": path, **LOOPBACK_ENV}.items())
        (self.home / ".bashrc").write_text(exports)
        (self.home / ".profile").write_text('[ -n "$BASH" ] && [ -f ~/.bashrc ] && . ~/.bashrc\n')
        (self.root / "sshd_config").write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {self.root}/host_key\nPidFile {self.root}/sshd.pid\n"
            f"AuthorizedKeysFile {self.root}/authorized_keys\nPermitRootLogin prohibit-password\n"
            "PubkeyAuthentication yes\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
            "StrictModes no\nX11Forwarding no\nPrintMotd no\nMaxStartups 50:30:100\nMaxSessions 50\n"
            f"SetEnv HOME={self.home}\n")
        if not Path("/run/sshd").exists():  # sshd's privilege-separation dir
            Path("/run/sshd").mkdir(mode=0o755)
            self.made_run_sshd = True
        run([SSHD, "-t", "-f", str(self.root / "sshd_config")], timeout=30)
        # PID 1 of the namespace is `sh`: it mounts a private /tmp/ray (ray stop's reset of
        # /tmp/ray/ray_current_cluster and the head's session dirs stay inside) and becomes sshd.
        # --kill-child: if unshare dies (it gets SIGTERM when this script dies), so does PID 1.
        inner = (f"mkdir -p /tmp/ray && mount -t tmpfs -o size=1g,mode=1777 apf-rayup /tmp/ray && "
                 f"exec {SSHD} -D -e -f {self.root}/sshd_config")
        with open(self.root / "sshd.log", "w") as out:
            self.process = subprocess.Popen(
                ["unshare", "--pid", "--fork", "--kill-child", "--mount-proc", "--propagation", "private",
                 "sh", "-c", inner], stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=_die_with_parent)
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("sshd did not start:\n" + (self.root / "sshd.log").read_text()) from None
                time.sleep(0.2)
        ours = os.readlink("/proc/self/ns/pid")
        for pid in descendants(self.process.pid):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/ns/pid") != ours:
                    self.pid_namespace = os.readlink(f"/proc/{pid}/ns/pid")
        if self.pid_namespace is None:
            raise RuntimeError("sshd is not in a PID namespace of its own")
        log(f"sshd up on 127.0.0.1:{self.port}, PID 1 of its own PID namespace (unshare pid {self.process.pid})")

    def namespace_pids(self) -> set[int]:
        """Every process of the namespace (all descend from its PID 1: orphans are reparented to it)."""
        return descendants(self.process.pid) if self.process is not None else set()

    def stop(self, timeout_s: float = 30) -> list[int]:
        """Stop sshd; the kernel then kills the rest of the namespace. Returns the processes still in it."""
        if self.process is not None:
            _kill_group(self.process, grace_s=15)
        if self.made_run_sshd:
            shutil.rmtree("/run/sshd", ignore_errors=True)
        deadline = time.monotonic() + timeout_s
        while True:
            left = [pid for pid in _all_pids() if self._in_namespace(pid)]
            if not left or time.monotonic() > deadline:
                return sorted(set(left))
            time.sleep(0.5)

    def _in_namespace(self, pid: int) -> bool:
        try:
            return self.pid_namespace is not None and os.readlink(f"/proc/{pid}/ns/pid") == self.pid_namespace
        except OSError:
            return False


def write_cluster_yaml(root: Path, sshd: PrivateSshd, name: str, ports: dict[str, int], with_worker: bool) -> Path:
    """The project's cluster.yaml, pointed at this machine, without `ray stop`, loopback-only."""
    cfg = yaml.safe_load((REPO / "cluster.yaml").read_text())
    cfg["cluster_name"] = name
    # the local provider names nodes by address string: "localhost" is a second name for 127.0.0.1
    cfg["provider"] = {"type": "local", "head_ip": "127.0.0.1", "worker_ips": ["localhost"] if with_worker else []}
    cfg["min_workers"] = cfg["max_workers"] = 1 if with_worker else 0
    cfg["auth"] = {"ssh_user": "root", "ssh_private_key": str(sshd.key),
                   "ssh_proxy_command": f"nc 127.0.0.1 {sshd.port}"}  # Ray's ssh has no port option
    # the project and the cluster's token as in cluster.yaml, plus the search file for the job
    cfg["file_mounts"] = {"~/apf-ray": str(REPO), "~/.ray/auth_token": "~/.ray/auth_token",
                          "~/apf-ray-job": str(root / "job")}
    if with_worker:
        (root / "tools").mkdir()
        (root / "tools" / "ray_start_loopback.py").write_text(LOOPBACK_NODE_START)
        (root / "tools" / "edge_nodes.py").write_text(EDGE_NODES.format(gcs=ports["gcs"]))
        cfg["file_mounts"]["~/tools"] = str(root / "tools")
    # instead of `pip install -e ~/apf-ray` into this machine's shared Python: check the synced copy imports
    cfg["setup_commands"] = ["cd ~/apf-ray && python3 -c 'import apf_ray, ray; "
                             "print(\"apf_ray from\", apf_ray.__file__, \"ray\", ray.__version__)'"]
    cfg["head_setup_commands"] = cfg["worker_setup_commands"] = []
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in LOOPBACK_ENV.items())
    common = f" --num-cpus=1 --object-store-memory={200 * 2**20} --disable-usage-stats"
    cfg["head_start_ray_commands"] = [  # NO `ray stop`
        f"{env} ray start --head --node-ip-address=127.0.0.1 --port={ports['gcs']}"
        f" --dashboard-host=127.0.0.1 --dashboard-port={ports['dashboard']}"
        f" --ray-client-server-port={ports['client']} --dashboard-agent-listen-port={ports['agent']}"
        f"{common} --resources='{{\"head_node\": 1}}' --autoscaling-config=~/ray_bootstrap_config.yaml"]
    if with_worker:  # cluster.yaml's CPU edge kind
        cfg["worker_start_ray_commands"] = [
            f"{env} RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1 python3 ~/tools/ray_start_loopback.py start"
            f" --address=127.0.0.1:{ports['gcs']} --node-ip-address=127.0.0.1"
            f" --dashboard-agent-listen-port={ports['agent2']}{common} --resources='{{\"edge_cpu\": 4}}'"]
    else:
        cfg["worker_start_ray_commands"] = ["true"]  # never the default `ray stop`
    path = root / "cluster.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def write_search(root: Path) -> None:
    """A 2-point grid over APF's threshold T on the default workload, 2 rounds, plus the FedAvg baseline.

    It is synced to the head as ~/apf-ray-job/, next to the project's copy ~/apf-ray/.
    """
    (root / "job").mkdir()
    search = {
        "name": "rayup",
        "base": "../apf-ray/configs/digits-lenet5.yaml",
        "overrides": {"train.rounds": 2, "cluster.pools": [{"name": "cpu", "num_actors": 1, "num_cpus": 1}]},
        "search_space": {"strategy.options.threshold": {"grid": [0.1, 0.3]}},
        "objective": [{"metric": "accuracy"}],
        "search": {"algorithm": "grid"},
        "num_samples": 1,
        "baseline": True,
    }
    (root / "job" / "search.yaml").write_text(yaml.safe_dump(search, sort_keys=False))


# The job's entrypoint, run on the head by the job supervisor (a shell; RAY_ADDRESS points at the
# cluster, the node's environment has RAY_AUTH_MODE=token). PYTHONPATH stands in for the
# `pip install -e ~/apf-ray` of cluster.yaml; the cwd ~/apf-ray is also on the workers' sys.path.
JOB = ("cd ~/apf-ray && export PYTHONPATH=$PWD && "
       "apf-ray tune --config ~/apf-ray-job/search.yaml --output ~/apf-ray-job/out")


def ensure_auth_token() -> None:
    """The cluster's token: ~/.ray/auth_token here, copied to the head by file_mounts."""
    if not (Path.home() / ".ray" / "auth_token").is_file():
        run(["ray", "get-auth-token", "--generate"], timeout=60, show=lambda _: False)  # it prints the token


def remove_client_files(name: str) -> None:
    """What ray up / exec / down leave on this side for the cluster: state and lock files, the
    cached provider config, the ssh ControlPath directory."""
    for path in Path("/tmp/ray").glob(f"cluster-{name}.*"):
        path.unlink(missing_ok=True)
    for path in Path(tempfile.gettempdir()).glob("ray-config-*"):
        try:
            if f'"cluster_name": "{name}"' in path.read_text():
                path.unlink()
        except OSError:
            pass
    user = hashlib.sha256(getpass.getuser().encode()).hexdigest()[:10]
    control = Path(f"/tmp/ray_ssh_{user}")
    shutil.rmtree(control / hashlib.sha256(name.encode()).hexdigest()[:10], ignore_errors=True)
    with contextlib.suppress(OSError):
        control.rmdir()  # only if no other cluster of this user uses it


def preflight() -> str | None:
    if os.geteuid() != 0:
        return "run as root (sshd with a private PID namespace, `unshare --pid`, `mount`)"
    tools = {"sshd": SSHD, "ssh": "ssh", "ssh-keygen": "ssh-keygen", "rsync": "rsync", "nc": "nc",
             "unshare": "unshare", "mount": "mount"}
    missing = [name for name, exe in tools.items() if shutil.which(exe) is None]
    if missing:
        return f"missing {', '.join(missing)}: install with `{INSTALL_HINT}`"
    if shutil.which("ray") is None:
        return "the `ray` command is not on PATH: run with the Python that has Ray 2.60 and apf-ray installed"
    return None


# --------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--with-worker", action="store_true",
                        help="also a worker node on this machine (launched by the head's autoscaler)")
    args = parser.parse_args()
    problem = preflight()
    if problem:
        print(f"ray_up_local.py: {problem}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that `finally` runs

    root = Path(tempfile.mkdtemp(prefix="apf-rayup-"))
    root.chmod(0o700)
    name = f"apf-rayup-{os.getpid()}"
    ports = {k: free_port() for k in ("gcs", "dashboard", "client", "agent", "agent2")}
    results: list[tuple[bool, str]] = []
    canary, sshd = Canary(root), PrivateSshd(root)
    cfg_path: Path | None = None
    down_rc: int | None = None
    try:
        ensure_auth_token()
        canary.start()
        sshd.start()
        write_search(root)
        cfg_path = write_cluster_yaml(root, sshd, name, ports, args.with_worker)
        log(f"cluster {name}: {cfg_path} (head 127.0.0.1, gcs :{ports['gcs']}, dashboard :{ports['dashboard']})")

        started = time.monotonic()
        run(["ray", "up", "-y", "--log-style=record", "--log-color=false", str(cfg_path)], timeout=900, env=UP_ENV,
            show=lambda line: re.search(r"\[\d/7\]|^apf_ray from|Ray runtime started", line) is not None)
        log(f"ray up took {time.monotonic() - started:.1f}s")
        if args.with_worker:
            waited = wait_for_worker(cfg_path, timeout_s=300)
            when = "not within 300s" if waited is None else f"{waited:.0f}s after ray up returned"
            verdict(waited is not None, f"worker: joined {when}", results)
        run(["ray", "exec", "--log-style=record", "--log-color=false", str(cfg_path),
             f"ray status --address=127.0.0.1:{ports['gcs']}"], timeout=180, env=UP_ENV,
            show=lambda line: re.match(r" \d", line) is not None)  # the node and resource lines
        wait_for_port(ports["dashboard"], timeout_s=120)

        # From this machine to the head's job server, as from a laptop to a real head; the job client
        # sends the token (~/.ray/auth_token) only with RAY_AUTH_MODE=token.
        rc, _ = run(["ray", "job", "submit", "--address", f"http://127.0.0.1:{ports['dashboard']}",
                     "--submission-id", f"{name}-tune", "--log-style=record", "--log-color=false",
                     "--", "sh", "-c", JOB],
                    timeout=1800, env={"RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0"}, check=False,
                    show=lambda line: re.search(r"cli\.py:(3[3-5]\d|6[68]) --", line) is None)  # not "Next steps"
        verdict(rc == 0, f"job: `apf-ray tune` as a Ray job on the ray-up head (ray job submit exit {rc})", results)
        summary_path = sshd.home / "apf-ray-job" / "out" / "summary.json"  # the head's disk is this disk
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
        statuses = summary.get("statuses", {})
        baseline = summary.get("baseline") is not None and (summary_path.parent / "baseline").is_dir()
        verdict(statuses.get("completed") == 2 and baseline,
                f"tune: {statuses.get('completed', 0)}/2 trials completed, baseline "
                f"{'done' if baseline else 'missing'} (the head's summary.json)", results)

        socks = listening_sockets(sshd.namespace_pids())
        wrong = [s for s in socks if not is_loopback(s[2])]
        verdict(bool(socks) and not wrong, f"loopback: {len(socks) - len(wrong)}/{len(socks)} listening sockets of "
                f"the cluster's processes on 127.0.0.1" + (f"; not: {wrong}" if wrong else ""), results)
    except (KeyboardInterrupt, SystemExit) as exc:  # Ctrl-C, or SIGTERM (the handler above); teardown follows
        verdict(False, f"interrupted ({'SIGTERM' if isinstance(exc, SystemExit) else 'SIGINT'})", results)
    except Exception as exc:  # a FAIL line; the teardown follows
        verdict(False, f"{type(exc).__name__}: {exc}", results)
    finally:
        if cfg_path is not None:
            try:
                started = time.monotonic()
                down_rc, _ = run(["ray", "down", "-y", "--log-style=record", "--log-color=false", str(cfg_path)],
                                 timeout=300, env=UP_ENV, check=False,
                                 show=lambda line: re.search(r"Running `ray stop`|Stopped|No nodes", line) is not None)
                log(f"ray down took {time.monotonic() - started:.1f}s")
            except Exception as exc:
                log(f"ray down: {type(exc).__name__}: {exc}")
            left = sorted({process_name(p) for p in sshd.namespace_pids()} & RAY_PROCESS_NAMES)
            verdict(down_rc == 0 and not left, f"ray down: exit {down_rc}, Ray processes left in the namespace: "
                    f"{', '.join(left) or 'none'}", results)
        in_namespace = sshd.stop()
        alive = canary.alive()
        verdict(alive, "canary: the Ray node outside the namespace " + (
            "survived ray down" if alive else "is gone"), results)
        canary.stop()
        remove_client_files(name)
        shutil.rmtree(root, ignore_errors=True)
        leftovers = [str(p) for p in (root, *Path("/tmp/ray").glob(f"cluster-{name}.*")) if p.exists()]
        leftovers += [f"pid {p.pid}" for p in (sshd.process, canary.process) if p is not None and p.poll() is None]
        leftovers += [f"pid {pid} (in the namespace)" for pid in in_namespace]
        verdict(not leftovers, "cleanup: sshd and its PID namespace gone, canary stopped, temp files removed"
                + (f"; left: {leftovers}" if leftovers else ""), results)
        failed = [what for ok, what in results if not ok]
        log(f"{'SUCCESS' if not failed else f'FAILED ({len(failed)} of {len(results)} checks)'}; "
            f"total wall time {time.monotonic() - T0:.1f}s")
    return 0 if not failed else 1


def wait_for_worker(cfg_path: Path, timeout_s: float) -> float | None:
    """Seconds until the worker joined: the head's autoscaler starts it over ssh after ray up returns."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        _, lines = run(["ray", "exec", "--log-style=record", "--log-color=false", str(cfg_path),
                        "python3 ~/tools/edge_nodes.py"], timeout=180, env=UP_ENV,
                       show=lambda line: line.startswith("EDGE_NODES"))
        if any(line.strip() == "EDGE_NODES 1" for line in lines):
            return time.monotonic() - started
        time.sleep(5)
    return None


if __name__ == "__main__":
    sys.exit(main())
