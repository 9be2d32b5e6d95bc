"""imedsam_core/atomic.py: an output that cannot be created is a one-line UserError naming it, raised before
anything is written."""

from __future__ import annotations

import pytest

from imedsam_core.atomic import atomic_dir, atomic_path, atomic_write_text, check_writable_parent
from imedsam_core.errors import UserError


@pytest.fixture
def a_file(tmp_path):
    f = tmp_path / "a_file"
    f.write_text("not a folder")
    return f


@pytest.mark.parametrize("depth", [1, 3])
def test_check_writable_parent_refuses_a_path_under_a_file(a_file, depth):
    target = a_file.joinpath(*["x"] * depth)
    with pytest.raises(UserError, match="a_file") as e:
        check_writable_parent(target)
    assert "\n" not in str(e.value) and "not a folder" in str(e.value)


def test_check_writable_parent_accepts_new_and_existing_folders(tmp_path):
    check_writable_parent(tmp_path / "new" / "deeper" / "out.json")  # created later by the writer
    check_writable_parent(tmp_path / "out.json")
    assert not (tmp_path / "new").exists()  # only a check: nothing is created


def test_atomic_writers_refuse_a_parent_that_is_a_file(a_file):
    with pytest.raises(UserError, match="a_file"), atomic_dir(a_file / "out"):
        pytest.fail("the body must not run")
    with pytest.raises(UserError, match="a_file"), atomic_path(a_file / "sub" / "x.bin"):
        pytest.fail("the body must not run")
    with pytest.raises(UserError, match="a_file"):
        atomic_write_text(a_file / "r.json", "{}")
    assert a_file.read_text() == "not a folder"
    assert sorted(p.name for p in a_file.parent.iterdir()) == ["a_file"]


def test_atomic_dir_creates_missing_parents(tmp_path):
    with atomic_dir(tmp_path / "a" / "b" / "out") as stage:
        (stage / "f.txt").write_text("ok")
    assert (tmp_path / "a" / "b" / "out" / "f.txt").read_text() == "ok"
    assert sorted(p.name for p in (tmp_path / "a" / "b").iterdir()) == ["out"]


def test_atomic_files_get_the_usual_permissions(tmp_path):
    import os
    import stat

    from imedsam_core.atomic import atomic_write_text

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o644
