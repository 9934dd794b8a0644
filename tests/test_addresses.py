"""Dead addresses fail fast: `apf-ray` probes a cluster's address before it asks Ray to join it.

Every case runs the real command line in a subprocess, on loopback only: a port where nothing
listens (127.0.0.1:1), an HTTP server (something listens, but no Ray cluster), and a listener
whose accept queue is full, which never answers a connection (like a host that is down).
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` keeps Ray's reading of 127.0.0.1 as 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import http.server
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LOOPBACK_ENV = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
LOOPBACK_ENV.pop("RAY_ADDRESS", None)


def train(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "apf_ray.cli", "train", "--quiet", "--set", "train.rounds=1", *args],
                            cwd=REPO, env=env or LOOPBACK_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def one_error_line(proc: subprocess.Popen, timeout: float = 120) -> str:
    """The command's only output: one ``error:`` line on stderr, exit status 2 (no Ray log lines)."""
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 2, out + err
    assert out == "", out
    [line] = err.splitlines()
    assert line.startswith("error: "), line
    return line


@pytest.mark.parametrize("origin", ["--address", "cluster.address", "RAY_ADDRESS"])
def test_an_address_where_nothing_listens_is_one_error_line_naming_it_and_where_it_came_from(tmp_path, origin):
    address = "127.0.0.1:1"
    if origin == "--address":
        proc = train("--address", address, "--output", str(tmp_path / "run"))
    elif origin == "cluster.address":
        proc = train("--set", f"cluster.address={address}", "--output", str(tmp_path / "run"))
    else:
        proc = train("--output", str(tmp_path / "run"), env={**LOOPBACK_ENV, "RAY_ADDRESS": address})
    line = one_error_line(proc)
    assert line.startswith(f"error: cannot reach the Ray cluster at {address} (from {origin}): connection refused")
    assert not (tmp_path / "run").exists()


def test_a_loopback_address_that_ray_rewrites_names_both_addresses(tmp_path):
    env = {**LOOPBACK_ENV, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"}
    line = one_error_line(train("--address", "127.0.0.1:1", "--output", str(tmp_path / "run"), env=env))
    assert "cannot reach the Ray cluster at 127.0.0.1:1 (from --address)" in line
    if "Ray dials it as" in line:  # a machine whose own address is not 127.0.0.1
        assert "unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0" in line


@contextlib.contextmanager
def http_server() -> Iterator[int]:
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def test_an_address_where_something_else_listens_is_refused_without_asking_ray(tmp_path):
    with http_server() as port:
        line = one_error_line(train("--address", f"127.0.0.1:{port}", "--output", str(tmp_path / "run")))
    assert f"cannot reach the Ray cluster at 127.0.0.1:{port} (from --address): something listens there but " \
           "it is not a Ray cluster's GCS" in line


@contextlib.contextmanager
def silent_listener() -> Iterator[int]:
    """A loopback port whose accept queue is full: a connection to it gets no answer (SYNs dropped)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    fillers = []
    for _ in range(3):
        filler = socket.socket()
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(("127.0.0.1", port))
        fillers.append(filler)
    try:
        yield port
    finally:
        for sock in [*fillers, server]:
            sock.close()


def _connecting_to(port: int) -> int:
    """How many sockets on this machine are in SYN_SENT towards 127.0.0.1:``port`` (/proc/net/tcp)."""
    target = f"0100007F:{port:04X}"
    with open("/proc/net/tcp") as table:
        return sum(fields[2] == target and fields[3] == "02" for fields in (line.split() for line in table))


def test_an_address_that_never_answers_fails_after_the_connect_timeout(tmp_path):
    with silent_listener() as port:
        line = one_error_line(train("--address", f"127.0.0.1:{port}", "--set", "cluster.connect_timeout_s=1",
                                    "--output", str(tmp_path / "run")))
    assert f"cannot reach the Ray cluster at 127.0.0.1:{port} (from --address): no answer to a connection " \
           "within 1 s (cluster.connect_timeout_s)" in line


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_while_the_address_is_tried_ends_the_command_at_once(tmp_path, signum, status):
    with silent_listener() as port:
        fillers = _connecting_to(port)
        proc = train("--address", f"127.0.0.1:{port}", "--set", "cluster.connect_timeout_s=300",
                     "--output", str(tmp_path / "run"))
        try:
            deadline = time.monotonic() + 120
            while _connecting_to(port) <= fillers:  # until the probe's connection attempt is under way
                assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
                time.sleep(0.1)
            proc.send_signal(signum)
            out, err = proc.communicate(timeout=60)  # far less than the 300 s the probe would wait
        finally:
            proc.kill()
    assert proc.returncode == status, out + err
    assert "Traceback" not in out + err
    assert not (tmp_path / "run").exists()
