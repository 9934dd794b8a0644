"""Output folders: one writer at a time, usable or refused up front, and a list of what apf-ray wrote.

Every command that writes a folder (``train``, ``compare``, ``tune``'s driver, ``reproduce``)
first claims it with :class:`OutputClaim`, before any cluster starts or any data loads:

- **Usable**: the folder is created if missing and a lock file is created in it, which is the
  real test that it can be written. A path under a file (``/etc/passwd/x``), an existing file,
  a folder this user cannot write, a read-only file system or a name longer than the file
  system allows is a :class:`~apf_ray.errors.SetupError` naming the path (exit 2 in the CLI).
- **One writer**: the lock file (:data:`LOCK_FILE`) is held with ``flock`` for the command's
  life and names its holder (command, PID, host, start time). A second command on the folder
  is refused naming that holder. The kernel releases a lock whose holder died, so a stale lock
  file never blocks; the holder removes it when it releases the claim (normal end, error,
  SIGINT/SIGTERM).
- **What apf-ray wrote**: writers add every file and folder they create to the folder's file
  list (:data:`FILE_LIST`, via :func:`record`) before or as they write it. ``--overwrite``
  (:func:`clear_run`) removes exactly those entries, and folders only once empty, so a user's
  ``journal/2026.txt`` survives. A folder holding a run without a file list (an older
  apf-ray wrote it) is not cleared: nothing proves which files are its own.

Run and search folders are told apart by their files (:data:`RUN_FILES`, :data:`SEARCH_FILE`):
:func:`refuse_for_run`, :func:`refuse_search` and :func:`refuse_for_search` say what a folder holds and what to do
instead. :func:`check_name` keeps config and search names names, not paths.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shlex
import socket
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from apf_ray.errors import SetupError
from apf_ray.variants import PLAN_FILE

LOCK_FILE = ".apf-ray.lock"
"""In a claimed folder while a command writes it: locked with ``flock``, JSON naming the holder."""

FILE_LIST = ".apf-ray-files.json"
"""Every path (relative, POSIX) apf-ray created in the folder: what ``--overwrite`` may remove."""

SEARCH_FILE = "search.json"
"""The resolved search a ``tune`` folder holds (written first, read by ``tune --resume``)."""

RUN_FILES = ("config.yaml", "summary.json", "rounds.parquet", "clients.parquet", "layers.parquet", "curves.png",
             "compare.json", "compare.png", PLAN_FILE, "journal", "checkpoints", "tensorboard")
"""What a run (or a compare) writes at the top of its folder: any of them marks the folder as holding one."""

NAME_MAX = 100
"""Longest config or search name (characters): it becomes part of folder names (``runs/<name>-<time>``)."""

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_EXCERPT = 120
"""Characters of a path quoted in an error (a 5,000-character path is not echoed whole)."""


def check_name(name: str) -> str:
    """``name`` if it is a name (letters, digits, ``._-``, not starting with ``.`` or ``-``,
    at most :data:`NAME_MAX` characters), else ValueError: it becomes a folder name, never a path."""
    if len(name) > NAME_MAX:
        raise ValueError(f"a name has at most {NAME_MAX} characters, got {len(name)}")
    if not _NAME.fullmatch(name):
        raise ValueError("not a name: use letters, digits, '.', '_' and '-', starting with a letter or digit "
                         "(it names folders; it is not a path)")
    return name


def _excerpt(text: str) -> str:
    if len(text) <= _EXCERPT:
        return text
    return f"{text[:_EXCERPT // 2]}…{text[-_EXCERPT // 4:]} ({len(text)} characters)"


# --------------------------------------------------------------------------- the claim


def _holder_text(command: str | None) -> str:
    if command is None:  # this process's command line; `python -m apf_ray.cli` is apf-ray too
        main_spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        ours = Path(sys.argv[0]).name == "apf-ray" or getattr(main_spec, "name", None) == "apf_ray.cli"
        command = shlex.join(["apf-ray" if ours else Path(sys.argv[0]).name or "python", *sys.argv[1:]])
    return json.dumps({"command": command[:300], "pid": os.getpid(), "host": socket.gethostname(),
                       "since": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")})


def _describe_holder(text: str) -> str:
    try:
        holder = json.loads(text)
        return f"{holder['command']!r} (PID {holder['pid']} on {holder['host']}, since {holder['since']})"
    except (ValueError, KeyError, TypeError):
        return "another apf-ray command (it has not written its name yet)"


def _unusable(folder: Path, err: OSError) -> SetupError:
    """One line saying why ``folder`` cannot be written, naming the part of the path at fault."""
    where = f"output folder {_excerpt(str(folder))}"
    if err.errno in (errno.ENOTDIR, errno.EEXIST):
        culprit = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), folder)
        return SetupError(f"{where} cannot be used: {_excerpt(str(culprit))} is a file, not a folder")
    if err.errno == errno.ENAMETOOLONG:
        longest = max(len(os.fsencode(part)) for part in folder.parts)
        return SetupError(f"{where} cannot be used: a name in it is longer than the file system allows "
                          f"({longest} bytes)")
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        reason = "read-only file system" if err.errno == errno.EROFS else "permission denied"
        return SetupError(f"{where} cannot be written ({reason}: {_excerpt(err.filename or str(folder))})")
    return SetupError(f"{where} cannot be used: {err.strerror or err}")


class OutputClaim:
    """Exclusive right to write ``folder`` while the ``with`` block runs (see the module doc).

    ``command`` names the holder in a refusal (default: this process's command line).
    Entering raises SetupError if the folder cannot be written or another command holds it;
    then nothing is left behind (folders it created are removed). Leaving removes the lock
    file, and the folders it created if they are still empty (a run that could not start).
    """

    def __init__(self, folder: str | Path, command: str | None = None) -> None:
        self.folder, self.command = Path(folder), command
        self._fd: int | None = None
        self._created: list[Path] = []

    def __enter__(self) -> OutputClaim:
        try:
            self._make_folder()
            self._lock()
        except BaseException:
            self._remove_created()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _make_folder(self) -> None:
        missing = []
        try:
            for path in (self.folder, *self.folder.parents):
                if path.is_dir():
                    break
                missing.append(path)
            for path in reversed(missing):
                path.mkdir(exist_ok=True)  # made meanwhile by someone else: fine; a file there: FileExistsError
                self._created.append(path)
        except OSError as err:
            raise _unusable(self.folder, err) from None

    def _lock(self) -> None:
        path = self.folder / LOCK_FILE
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as err:
                raise _unusable(self.folder, err) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 4096).decode("utf-8", "replace")
                os.close(fd)
                raise SetupError(f"{_excerpt(str(self.folder))} is in use by {_describe_holder(holder)}; one "
                                 "command writes a folder at a time: wait for it, or choose another --output") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the holder removed this lock file as we opened it: lock the new one
        os.ftruncate(fd, 0)
        os.write(fd, _holder_text(self.command).encode())
        self._fd = fd

    def release(self) -> None:
        """Remove the lock file, then unlock (so no one locks a file about to vanish), then tidy up."""
        if self._fd is not None:
            with contextlib.suppress(FileNotFoundError):
                (self.folder / LOCK_FILE).unlink()
            os.close(self._fd)
            self._fd = None
        self._remove_created()

    def _remove_created(self) -> None:
        for path in reversed(self._created):
            with contextlib.suppress(OSError):  # not empty: a run wrote it, keep it
                path.rmdir()
        self._created = []


# --------------------------------------------------------------------------- what a folder holds


def run_files(folder: Path) -> list[str]:
    """The run outputs present at the top of ``folder`` (empty: no run there)."""
    folder = Path(folder)
    return [name for name in RUN_FILES if (folder / name).exists()] if folder.is_dir() else []


def refuse_search(folder: Path) -> None:
    """SetupError if ``folder`` holds a search: runs and compares never write into one."""
    if (Path(folder) / SEARCH_FILE).is_file():
        raise SetupError(f"{folder} holds a Ray Tune search ({SEARCH_FILE}); choose another --output "
                         f"(continue the search with apf-ray tune --resume {folder})")


def refuse_for_run(folder: Path, overwrite: bool) -> None:
    """SetupError unless a run may be written into ``folder`` (``train``, a ``compare`` variant).

    A search is never replaced; a run only with ``overwrite``, and only one whose files are listed.
    """
    folder = Path(folder)
    refuse_search(folder)
    found = run_files(folder)
    if not found:
        return
    if not overwrite:
        raise SetupError(f"{folder} already holds a run ({', '.join(found)}); continue it with "
                         f"--resume {folder}, or replace it with --overwrite")
    if not recorded(folder):
        raise SetupError(f"{folder} holds a run without a list of the files apf-ray wrote ({FILE_LIST}; an older "
                         "apf-ray wrote it): --overwrite removes only listed files; remove it yourself, or choose "
                         "another --output")


def refuse_for_search(folder: Path, resume: bool) -> None:
    """SetupError unless ``folder`` may receive a search: new (no run, no search), or the one ``resume`` continues."""
    folder = Path(folder)
    found = run_files(folder)
    search = (folder / SEARCH_FILE).is_file()
    if search and not resume:
        if (folder / "summary.json").is_file():
            raise SetupError(f"{folder} holds a finished search; choose another --output")
        raise SetupError(f"{folder} already holds a search; continue it with apf-ray tune --resume {folder}, "
                         "or choose another --output")
    if found and not search:
        raise SetupError(f"{folder} holds a run ({', '.join(found)}), not a search; choose another --output")


def check_search_folder(folder: Path) -> None:
    """SetupError unless ``folder`` holds a search for ``apf-ray tune --resume`` (checked before the
    folder is claimed, so a mistyped path is not created)."""
    folder = Path(folder)
    if (folder / SEARCH_FILE).is_file():
        return
    if not folder.is_dir():
        raise SetupError(f"--resume {folder}: no such folder")
    hint = (f"; it holds a train run: resume it with apf-ray train --resume {folder}"
            if (folder / "config.yaml").is_file() else "")
    raise SetupError(f"--resume {folder} is not a search folder (it has no {SEARCH_FILE}){hint}")


# --------------------------------------------------------------------------- the file list


def recorded(folder: Path) -> list[str]:
    """The paths (relative) apf-ray listed as written in ``folder``; empty if there is no list."""
    path = Path(folder) / FILE_LIST
    if not path.is_file():
        return []
    try:
        files = json.loads(path.read_text())["files"]
        if isinstance(files, list) and all(isinstance(f, str) for f in files):
            return files
    except (ValueError, KeyError, TypeError):
        pass
    raise SetupError(f"{path} is damaged (not a JSON list of the files apf-ray wrote); remove it, and the "
                     "run's files yourself")


def record(folder: Path, *paths: str | Path) -> None:
    """Add ``paths`` (relative to ``folder``, or absolute inside it) to the folder's file list.

    Writers call it before (or right after, for names they cannot know earlier) creating a
    file or folder; the list is replaced atomically, so a crash leaves the old or the new list.
    """
    folder = Path(folder)
    base = folder.resolve()
    names = set(recorded(folder))
    for path in paths:
        path = Path(path)
        names.add((path.resolve().relative_to(base) if path.is_absolute() else path).as_posix())
    tmp = folder / f"{FILE_LIST}.tmp"
    tmp.write_text(json.dumps({"files": sorted(names)}, indent=0) + "\n")
    tmp.replace(folder / FILE_LIST)


def record_tree(folder: Path, directory: Path, names: Sequence[str]) -> None:
    """List ``directory`` (inside ``folder``), its parents up to ``folder`` and its files ``names``:
    for a directory apf-ray writes whole (a checkpoint, renamed into place), listed by the names
    it will hold, since a checkpoint written in the background may not exist yet."""
    directory = Path(directory).resolve()
    base = Path(folder).resolve()
    parents = [p for p in directory.parents if p != base and base in p.parents]
    record(folder, *parents, directory, *(directory / name for name in names))


def clear_run(folder: Path) -> list[str]:
    """Remove what apf-ray listed as written in ``folder``, and nothing else; returns the top-level names removed.

    Files go; listed folders go only once empty, so a file of the user's inside one keeps it.
    Entries that are links, or lead out of ``folder`` (``..``, a listed folder replaced by a
    link), are skipped: apf-ray never writes those. The list itself goes last.
    """
    folder = Path(folder)
    base = folder.resolve()
    entries = sorted(recorded(folder), key=lambda p: p.count("/"), reverse=True)
    removed: set[str] = set()
    for entry in entries:
        path = folder / entry
        if Path(entry).is_absolute() or ".." in Path(entry).parts or path.is_symlink() \
                or not path.parent.resolve().is_relative_to(base):
            continue  # apf-ray writes no links and nothing outside the folder: a list that says so is not ours
        try:
            if path.is_dir():
                path.rmdir()
            else:
                path.unlink()
        except OSError:
            continue  # gone already (an old checkpoint), or a folder still holding the user's files
        removed.add(entry.split("/", 1)[0])
    (folder / FILE_LIST).unlink(missing_ok=True)
    return [name for name in RUN_FILES if name in removed] + sorted(removed - set(RUN_FILES))
