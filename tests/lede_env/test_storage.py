"""Storage: atomic files and folders (a killed or failing writer leaves the old file or the new one, whole)."""

from __future__ import annotations

import pytest

from lede_env.storage import atomic_folder


def test_atomic_folder(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        with atomic_folder(target) as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise KeyboardInterrupt
    assert not target.exists() and list(tmp_path.iterdir()) == []
    with atomic_folder(target) as tmp:
        (tmp / "whole.bin").write_bytes(b"y")
    assert (target / "whole.bin").read_bytes() == b"y"
    with atomic_folder(target, replace=False) as tmp:
        (tmp / "other.bin").write_bytes(b"z")
    assert sorted(p.name for p in target.iterdir()) == ["whole.bin"]


def _hammer(path, value, n):
    from lede_env.storage import write_json_atomic

    for i in range(n):
        write_json_atomic(path, {"writer": value, "i": i, "pad": "x" * 20_000})


def test_concurrent_writers_leave_one_whole_file(tmp_path):
    """Two processes rewriting the same cache file: every read sees a whole JSON from one of them."""
    import json
    import multiprocessing as mp

    path = tmp_path / "cache.json"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_hammer, args=(path, w, 150)) for w in ("a", "b")]
    for p in procs:
        p.start()
    reads = 0
    while any(p.is_alive() for p in procs):
        if path.exists():
            d = json.loads(path.read_text())  # never a mix or a truncated file
            assert d["writer"] in ("a", "b") and len(d["pad"]) == 20_000
            reads += 1
    for p in procs:
        p.join()
        assert p.exitcode == 0
    assert json.loads(path.read_text())["i"] == 149
    assert [f.name for f in tmp_path.iterdir()] == ["cache.json"]  # no temporary files left


def test_full_disk_gives_an_error_and_leaves_nothing(tmp_path, monkeypatch):
    import errno
    import json

    from lede_env.storage import write_json_atomic

    path = tmp_path / "x.json"
    write_json_atomic(path, {"old": True})

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(json, "dump", full)
    with pytest.raises(OSError, match="No space left"):
        write_json_atomic(path, {"new": True})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"old": True}  # the previous whole file is kept
    assert [f.name for f in tmp_path.iterdir()] == ["x.json"]


def test_recorded_packaged_file_is_found_and_superseded_entries_go(tmp_path):
    from lede_env.storage import packaged_file, record_packaged_file

    old, new, other = tmp_path / "m-old.bin", tmp_path / "m-new.bin", tmp_path / "x.bin"
    for f, data in ((old, b"old"), (new, b"new"), (other, b"other")):
        f.write_bytes(data)
    record_packaged_file(old, "m/1", made_by="test")
    record_packaged_file(other, "x/1")
    man = record_packaged_file(new, "m/2", superseded=lambda k: k.startswith("m/"), tokens=3)
    assert set(man) == {"m/2", "x/1"} and man["m/2"]["tokens"] == 3 and not old.exists()
    assert packaged_file(tmp_path, "m/2", "test file") == new and packaged_file(tmp_path, "x/1", "test file") == other
    assert packaged_file(tmp_path, "m/1", "test file") is None


def test_packaged_file_damaged_after_a_check_is_refused(tmp_path):
    """The checksum is memoised per file state: a file changed after it passed is hashed again
    and refused (with a warning), never trusted from the memo."""
    import os

    from lede_env.storage import packaged_file, record_packaged_file

    f = tmp_path / "t.bin"
    f.write_bytes(b"good bytes")
    record_packaged_file(f, "t/1")
    assert packaged_file(tmp_path, "t/1", "test file") == f
    assert packaged_file(tmp_path, "t/1", "test file") == f  # memoised
    st = f.stat()
    f.write_bytes(b"bad  bytes")  # same size
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    with pytest.warns(UserWarning, match="fails its checksum"):
        assert packaged_file(tmp_path, "t/1", "test file") is None
