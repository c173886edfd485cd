"""Atomic writes: a failed write keeps the previous file whole, and files get ordinary permissions."""
import os
import stat

import pytest

from dinov2.utils.io import FILE_MODE, atomic_write, atomic_write_text


def test_a_write_that_fails_midway_leaves_the_previous_file_and_no_temporary(tmp_path):
    target = tmp_path / "results.json"
    atomic_write_text(target, "old")

    def crash(file):
        file.write(b"half of the new cont")
        raise KeyboardInterrupt  # as a kill would interrupt it

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, crash)
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["results.json"]


def test_permissions_are_those_of_open_unless_a_mode_is_asked(tmp_path):
    written = atomic_write_text(tmp_path / "deep" / "er" / "a.txt", "x")  # parents are created
    assert stat.S_IMODE(written.stat().st_mode) == FILE_MODE
    secret = atomic_write_text(tmp_path / "salt", "s", mode=0o600)
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    with open(tmp_path / "plain", "w"):
        pass
    assert FILE_MODE == stat.S_IMODE((tmp_path / "plain").stat().st_mode)
