"""What imedsam-serve removes after a tritonserver that did not unload its models, without Triton: stand-in stub
processes (named and called as Triton's are) and directories in a stand-in /tmp. The real server's case is in
test_serve.py (test_stop_with_requests_in_flight_leaves_nothing)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from imedsam_deploy import triton_leftovers
from imedsam_deploy.triton_leftovers import Leftovers

pytestmark = pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="reads /proc (Linux)")


def fake_stub(model_dir: Path) -> subprocess.Popen:
    """A process whose argv is a Python backend stub's: ``.../triton_python_backend_stub <dir>/1/model.py ...``."""
    script = model_dir / "1" / "model.py"
    script.parent.mkdir(parents=True)
    script.write_text("import time\ntime.sleep(120)\n")
    return subprocess.Popen([f"/opt/tritonserver/backends/python/{triton_leftovers.STUB}", str(script), "shm-name"],
                            executable=sys.executable)


def test_removes_its_model_copies_processes_and_environment_only(tmp_path, monkeypatch):
    monkeypatch.setattr(triton_leftovers, "TRITON_TMP", tmp_path)
    others = tmp_path / "python_env_OTHER1"  # another server's, there before ours started
    others.mkdir()
    left = Leftovers()
    left.before_start()
    copy, repo = tmp_path / "folderAb12Cd", tmp_path / "repository" / "segment"
    stubs = [fake_stub(copy), fake_stub(repo)]
    try:
        ours = tmp_path / "python_env_OURS12"
        ours.mkdir()
        left.started()
        assert left.copies == {copy}, "only Triton's /tmp/folderXXXXXX copies count, not a model repository"
        left.note()
        assert {s.pid for s in stubs} <= set(left.procs)
        left.end()
        assert all(s.poll() is not None for s in stubs), "the stubs were not ended"
        assert not copy.exists() and not ours.exists()
        assert repo.is_dir() and others.is_dir(), "removed what was not this server's"
    finally:
        for s in stubs:
            s.kill()
            s.wait()


def test_an_environment_directory_it_cannot_tell_apart_is_left(tmp_path, monkeypatch):
    """Two appeared while it started (another server started meanwhile): either could be ours, so neither goes;
    one with something in it stays too."""
    monkeypatch.setattr(triton_leftovers, "TRITON_TMP", tmp_path)
    left = Leftovers()
    left.before_start()
    two = [tmp_path / "python_env_AAAAAA", tmp_path / "python_env_BBBBBB"]
    for d in two:
        d.mkdir()
    left.started()
    left.end()
    assert all(d.is_dir() for d in two)

    left.before_start()
    full = tmp_path / "python_env_CCCCCC"
    (full / "bin").mkdir(parents=True)
    left.started()
    left.end()
    assert full.is_dir()


def _copy_with_config(d: Path, workspace: str) -> Path:
    (d / "1").mkdir(parents=True)
    (d / "config.pbtxt").write_text(f'name: "encode"\nparameters {{\n  key: "workspace-path"\n  value {{\n'
                                    f'    string_value: "{workspace}"\n  }}\n}}\nbackend: "python"\n')
    return d


def test_a_copy_whose_stub_is_gone_is_found_by_the_workspace_its_config_names(tmp_path, monkeypatch):
    """A tritonserver killed while it started: its stubs exit before anything notes them, so only the copies'
    configs (PyTriton writes its workspace there) say whose they are."""
    monkeypatch.setattr(triton_leftovers, "TRITON_TMP", tmp_path / "tmp")
    ws = tmp_path / "ws"
    ours = _copy_with_config(tmp_path / "tmp" / "folderAAAAAA", str(ws.resolve()))
    other = _copy_with_config(tmp_path / "tmp" / "folderBBBBBB", str(ws.resolve()) + "2")  # another server's
    nested = _copy_with_config(tmp_path / "tmp" / "folderCCCCCC", str(ws.resolve() / "x"))
    bare = tmp_path / "tmp" / "folderDDDDDD"  # being copied, or not Triton's: no config
    bare.mkdir()
    left = Leftovers()
    left.before_start(ws)
    left.note()  # no stub runs
    left.end()
    assert not ours.exists()
    assert other.is_dir() and nested.is_dir() and bare.is_dir(), "removed what was not this server's"
