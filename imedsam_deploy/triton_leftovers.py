"""What a stopped tritonserver can leave behind on Linux, and ending it.

A clean stop unloads every model and the server removes all of its own. But tritonserver's exit timeout also
covers draining HTTP connections: clients that keep theirs open (any keep-alive client mid-stream) use it up,
the server then "exits immediately" without unloading, and leaves
- the Python backend stubs, their multiprocessing helpers and their /dev/shm segments;
- a copy of each model's directory, ``/tmp/folderXXXXXX`` (Triton core localises a model loaded through the
  repository API into a fresh directory there; ``/tmp`` is fixed, TMPDIR is not read);
- the Python backend's empty execution-environment directory, ``/tmp/python_env_XXXXXX``.

``Leftovers`` records the first two exactly (the stubs' command lines name their model copies) once the models
are ready and again just before the stop, and ``end()`` after the stop ends the processes and removes the rest.
A copy whose stub has gone (a tritonserver killed while it started: the stubs exit before anything notes them)
is named by its config, where PyTriton writes its workspace, which is the server's own (PyTriton makes it).
Nothing names the environment directory: ours is the one that appeared in /tmp while our server started.
Elsewhere than Linux every step finds nothing and does nothing.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

TRITON_TMP = Path("/tmp")  # Triton core's kDefaultMountDirectory, where it localises model directories
STUB = "triton_python_backend_stub"


def adopt_orphans() -> None:
    """Make this process the reaper of its orphaned descendants (Linux): a stub whose tritonserver exited
    stays below us, where ``Leftovers`` finds it, instead of moving to the machine's init."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER


def _pids() -> list[int]:
    return [int(d) for d in os.listdir("/proc") if d.isdigit()] if Path("/proc/self/stat").exists() else []


def _stat(pid: int) -> tuple[str, list[str]] | None:
    """(command name, the fields after it) of /proc/PID/stat; None once the process is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    head, _, rest = text.rpartition(")")
    return head.partition("(")[2], rest.split()


def _argv(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (empty where there is no /proc)."""
    children: dict[int, list[int]] = {}
    for p in _pids():
        st = _stat(p)
        if st is not None and len(st[1]) > 1 and st[1][1].isdigit():
            children.setdefault(int(st[1][1]), []).append(p)
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def shm_mapped(pids: Sequence[int]) -> set[str]:
    """Names of the /dev/shm segments that ``pids`` map."""
    names: set[str] = set()
    for p in pids:
        with contextlib.suppress(OSError):
            names |= {ln.split("/dev/shm/", 1)[1].split()[0] for ln in Path(f"/proc/{p}/maps").read_text().splitlines()
                      if "/dev/shm/" in ln}
    return names


def model_copies(pids: Sequence[int]) -> set[Path]:
    """The localised model directories that the Python backend stubs among ``pids`` run from: a stub's first
    argument is ``<model dir>/<version>/model.py``; only Triton's own ``/tmp/folderXXXXXX`` copies count."""
    out: set[Path] = set()
    for p in pids:
        argv = _argv(p)
        if len(argv) > 1 and Path(argv[0]).name == STUB:
            d = Path(argv[1]).parent.parent
            if d.parent == TRITON_TMP and d.name.startswith("folder") and len(d.name) == len("folderXXXXXX"):
                out.add(d)
    return out


_WORKSPACE_PARAM = re.compile(r'key:\s*"workspace-path"\s*value\s*\{\s*string_value:\s*"([^"]*)"')


def copies_naming(workspace: Path) -> set[Path]:
    """Triton's model copies whose config names ``workspace`` (PyTriton's ``workspace-path`` parameter)."""
    want = str(workspace.resolve())  # as PyTriton writes it
    out: set[Path] = set()
    for d in TRITON_TMP.glob("folder??????"):
        try:
            m = _WORKSPACE_PARAM.search((d / "config.pbtxt").read_text())
        except (OSError, UnicodeDecodeError):
            continue
        if m is not None and m.group(1) == want:
            out.add(d)
    return out


def python_envs() -> set[Path]:
    return set(TRITON_TMP.glob("python_env_??????"))


def _running(pid: int) -> bool:
    st = _stat(pid)
    return st is not None and bool(st[1]) and st[1][0] != "Z"


def end_processes(pids: Sequence[int], grace_s: float = 5.0) -> None:
    """Give ``pids`` (the server's processes, noted before its stop) ``grace_s`` to exit, then kill those left.
    A process id is only reused after its process is gone, and these were noted seconds ago."""
    import signal

    end = time.monotonic() + grace_s
    while time.monotonic() < end and any(_running(p) for p in pids):
        time.sleep(0.1)
    for p in pids:
        if _running(p):
            with contextlib.suppress(OSError):
                os.kill(p, signal.SIGKILL)
    for p in pids:  # those adopted as our children (see adopt_orphans) are reaped here
        with contextlib.suppress(OSError):
            os.waitpid(p, 0)


@dataclass
class Leftovers:
    """One server's leftovers: ``before_start()``, ``started()`` once its models are ready, ``note()`` just
    before its stop, ``end()`` after it."""

    envs_before: set[Path] | None = None
    env: Path | None = None
    workspace: Path | None = None  # PyTriton's, which each of its model configs names
    procs: list[int] = field(default_factory=list)
    shm: set[str] = field(default_factory=set)
    copies: set[Path] = field(default_factory=set)

    def before_start(self, workspace: Path | None = None) -> None:
        self.envs_before = python_envs()
        self.workspace = workspace

    def _find_env(self) -> None:
        # ours is the one directory that appeared while we started; two mean another server started meanwhile
        # and either could be ours, so neither is touched
        if self.envs_before is not None and self.env is None:
            new = python_envs() - self.envs_before
            self.env = new.pop() if len(new) == 1 else None
            self.envs_before = None

    def started(self) -> None:
        self._find_env()
        # paths only (a process id noted now could belong to another process by the time of the stop)
        self.copies |= model_copies(descendants(os.getpid()))

    def note(self) -> None:
        self.procs = descendants(os.getpid())
        self.shm = shm_mapped(self.procs)
        self.copies |= model_copies(self.procs)

    def end(self) -> None:
        self._find_env()  # a start that failed before its models were ready
        end_processes(self.procs)
        if self.workspace is not None:
            self.copies |= copies_naming(self.workspace)
        for name in self.shm:
            with contextlib.suppress(OSError):
                os.unlink(f"/dev/shm/{name}")
        for d in self.copies:
            shutil.rmtree(d, ignore_errors=True)
        if self.env is not None:
            with contextlib.suppress(OSError):
                self.env.rmdir()  # only while empty: the backend extracts nothing there for our models
        self.procs, self.shm, self.copies, self.env = [], set(), set(), None
