"""Atomic writes (pneumoscan.io): the permissions a written file gets, without touching the process's mask."""
from __future__ import annotations

import os
import stat
import sys

import pytest

from pneumoscan import io as pio


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/status is Linux's")
def test_umask_is_read_without_setting_it(monkeypatch, tmp_path):
    # setting the mask to read it leaves it 0 for the whole process for a moment: a file another thread
    # (the extraction's writer, the service) creates then would be world-writable
    old = os.umask(0o027)
    try:
        monkeypatch.setattr(os, "umask", lambda *_: pytest.fail("the mask was set to be read"))
        assert pio._umask() == 0o027
        with pio.atomic_write(tmp_path / "a.txt", "w") as f:
            f.write("x")
        assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o640
    finally:
        monkeypatch.undo()
        os.umask(old)


def test_a_write_that_fails_without_a_file_name_names_the_output(tmp_path):
    """A full disk fails write() with ENOSPC and no file name: the one error line said 'No space left on
    device' without saying which output."""
    import errno

    from pneumoscan.io import atomic_write

    target = tmp_path / "p.csv"
    with pytest.raises(OSError) as e:
        with atomic_write(target, "w"):
            raise OSError(errno.ENOSPC, "No space left on device")
    assert e.value.filename == str(target) and e.value.errno == errno.ENOSPC
    assert not target.exists() and list(tmp_path.iterdir()) == []  # nothing half written
