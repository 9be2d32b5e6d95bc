"""malloc keeps freed memory in the torch-side commands (imedsam_core.malloc): a freed tensor's pages are reused,
not handed back to the kernel and faulted in again; the user's own glibc settings and $IMEDSAM_MALLOC=glibc win;
the ONNX Runtime commands leave malloc alone."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from imedsam_core import malloc
from imedsam_core.errors import UserError
from tests.conftest import REPO

GLIBC = malloc.is_glibc()

# 20 tensors of 64 MiB made and freed, after ten to warm up: the minor page faults they cost. The warm-up is long
# because glibc's heap grows a few times before a freed chunk fits the next aligned request (6 with glibc 2.36)
_FAULTS = """
import resource, torch
from imedsam_core import malloc
print(malloc.keep_freed_memory())
for _ in range(10):
    torch.empty(16 << 20).fill_(1.0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    torch.empty(16 << 20).fill_(1.0)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k != malloc.ENV and k not in malloc.GLIBC_SETTINGS}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300,
                          env={**clean, **env})


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_freed_tensors_are_reused_not_faulted_in_again():
    tuned, default = _python(_FAULTS), _python(_FAULTS, IMEDSAM_MALLOC="glibc")
    assert tuned.returncode == 0 and default.returncode == 0, tuned.stderr + default.stderr
    (t_state, t_faults), (d_state, d_faults) = tuned.stdout.split("\n")[:2], default.stdout.split("\n")[:2]
    assert t_state == "tuned" and "IMEDSAM_MALLOC=glibc" in d_state
    # glibc's default maps each 64 MiB tensor afresh: at least one fault a page (16384 of 4 KiB, or 32 where the
    # kernel backs it with 2 MiB pages); kept memory is faulted in during the warm-up only
    assert int(d_faults) >= 20 * 32, default.stdout
    assert int(t_faults) < 20, tuned.stdout


def test_the_users_glibc_settings_win(monkeypatch):
    monkeypatch.setattr(malloc, "state", malloc.state)
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    assert malloc.keep_freed_memory() == "left as set (MALLOC_TRIM_THRESHOLD_)" == malloc.state
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=65536")
    assert malloc.keep_freed_memory() == "left as set (GLIBC_TUNABLES)"
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.cpu.hwcaps=-AVX2")  # not malloc's: ours apply
    assert malloc.keep_freed_memory() == ("tuned" if GLIBC else malloc.state)


def test_a_bad_setting_is_one_line_naming_the_variable(monkeypatch):
    monkeypatch.setenv(malloc.ENV, "jemalloc")
    with pytest.raises(UserError, match=r"\$IMEDSAM_MALLOC='jemalloc': must be one of tuned, glibc"):
        malloc.keep_freed_memory()
    res = _python("from imedsam_train.eval_cli import main; main()", IMEDSAM_MALLOC="jemalloc")
    assert res.returncode == 2 and res.stderr.strip().splitlines() == \
        ["error: $IMEDSAM_MALLOC='jemalloc': must be one of tuned, glibc"], res.stderr


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_the_torch_commands_tune_malloc_and_the_runtime_only_where_it_loads_torch():
    code = """
import sys
from imedsam_core import malloc
from imedsam_deploy import cli_infer
from imedsam_deploy.backends import torch_part
from imedsam_export import cli as export_cli
from imedsam_train import cli as train_cli, eval_cli

def state_after(main):
    malloc.state = None
    sys.argv = ["x", "--help"]
    try:
        main()
    except SystemExit:
        pass
    return malloc.state

print([state_after(m) for m in (cli_infer.main, train_cli.main, eval_cli.main, export_cli.main)])
malloc.state = None
torch_part("cpu_options")
print(malloc.state)
"""
    res = _python(code)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split("\n")[-3:-1] == [str([None, "tuned", "tuned", "tuned"]), "tuned"], res.stdout
