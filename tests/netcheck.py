"""Which TCP ports a set of processes listens on, read from /proc (Linux; no psutil, no `ss`).

``listening_sockets(pids)`` maps each process's socket file descriptors (``/proc/PID/fd`` →
``socket:[inode]``) to the LISTEN entries of ``/proc/PID/net/tcp`` and ``tcp6``.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
from collections.abc import Iterable

_TCP_LISTEN = "0A"


def descendants(pid: int) -> set[int]:
    """All live descendants of ``pid`` (not ``pid`` itself)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
        except OSError:
            continue
        rest = stat[stat.rfind(")") + 2 :].split()  # "pid (comm) state ppid ...": comm may hold spaces
        children.setdefault(int(rest[1]), []).append(int(entry))
    out: set[int] = set()
    stack = [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in out:
                out.add(child)
                stack.append(child)
    return out


def _socket_inodes(pid: int) -> set[int]:
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return set()
    inodes = set()
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def _decode_addr(hex_addr: str, family: int) -> str:
    raw = bytes.fromhex(hex_addr)
    if family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, struct.pack("<I", struct.unpack(">I", raw)[0]))
    words = struct.unpack("<4I", raw)  # tcp6: four host-order 32-bit words
    return socket.inet_ntop(socket.AF_INET6, struct.pack(">4I", *words))


def _listen_table(pid: int) -> dict[int, tuple[str, int]]:
    """inode → (address, port) of TCP LISTEN sockets in ``pid``'s network namespace."""
    table: dict[int, tuple[str, int]] = {}
    for name, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        try:
            with open(f"/proc/{pid}/net/{name}") as f:
                lines = f.readlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if len(cols) >= 10 and cols[3] == _TCP_LISTEN:
                hex_addr, hex_port = cols[1].split(":")
                table[int(cols[9])] = (_decode_addr(hex_addr, family), int(hex_port, 16))
    return table


def listening_sockets(pids: Iterable[int]) -> list[tuple[int, str, int]]:
    """``(pid, address, port)`` for every TCP socket in LISTEN state held by ``pids``."""
    out = []
    for pid in sorted(set(pids)):
        table = _listen_table(pid)
        out += [(pid, *table[inode]) for inode in sorted(_socket_inodes(pid)) if inode in table]
    return out


def is_loopback(addr: str) -> bool:
    ip = ipaddress.ip_address(addr)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def alive(pids: Iterable[int]) -> list[int]:
    """Those of ``pids`` that still run (zombies, which only wait to be reaped, do not count)."""
    out = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        if stat[stat.rfind(")") + 2 :].split()[0] != "Z":
            out.append(pid)
    return out
