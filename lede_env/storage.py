"""Storage: lede's cache folder and the one way files and folders are published.

Every file or folder another process may read (converted models, traces, exit heads, cost
profiles, datasets, runs, results) is written under a temporary name beside its final path and
renamed when whole (:func:`atomic_file`, :func:`atomic_folder`); temporaries name their host and
process, so a killed writer's leftovers go with the next write (:func:`remove_stale_temporaries`).
Each publication passes two crash points (:func:`crash_point`), where ``tests/test_kill.py``
SIGKILLs the process.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Optional


def cache_dir() -> Path:
    """Root folder of lede's caches (converted models, traces, exit heads, cost profiles).

    ``$LEDE_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/lede``, else ``~/.cache/lede``.
    """
    if os.environ.get("LEDE_CACHE_DIR"):
        return Path(os.environ["LEDE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lede"


#: Crash testing (SQLite-style): with ``$LEDE_CRASH_AT=N`` the process SIGKILLs itself at the N-th
#: crash point (every publication of a file or folder has one before and one after its rename);
#: with ``$LEDE_CRASH_COUNT=PATH`` it writes the number of crash points it passed to PATH at exit.
#: ``tests/test_kill.py`` uses both; nothing else sets them.
_CRASH = {"n": 0}


def crash_point() -> None:
    """Count a crash point; SIGKILL this process if it is the one ``$LEDE_CRASH_AT`` names."""
    _CRASH["n"] += 1
    at = os.environ.get("LEDE_CRASH_AT")
    if at and _CRASH["n"] == int(at):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)
    if _CRASH["n"] == 1 and os.environ.get("LEDE_CRASH_COUNT"):
        import atexit

        atexit.register(lambda: Path(os.environ["LEDE_CRASH_COUNT"]).write_text(str(_CRASH["n"])))


def host_tag() -> str:
    """This machine's name reduced to letters and digits (at most 24): temporaries and partial
    datasets carry it with their process id, so only this host's dead writers are cleaned up."""
    import re
    import socket

    return re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:24] or "host"


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (another user's counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def _temp_prefix(name: str) -> str:
    """``.<name>.lede-<host>-<pid>-``: temporaries name their process, so a later writer can tell
    a dead process's leftovers (SIGKILL runs no clean-up) from a live writer's work."""
    return f".{name}.lede-{host_tag()}-{os.getpid()}-"


def remove_stale_temporaries(final: Path) -> list[Path]:
    """Remove the temporaries of ``final`` (files or folders named by :func:`_temp_prefix`) whose
    process on this host has ended; return what was removed. Every atomic write calls it first:
    one rule, so a killed writer's leftovers go with the next write of the same file."""
    import re

    final = Path(final)
    host = host_tag()
    removed = []
    if not final.parent.is_dir():
        return removed
    for name in (final.stem, final.name):
        for p in final.parent.glob(f".{name}.lede-*"):
            m = re.match(rf"^\.{re.escape(name)}\.lede-([A-Za-z0-9]+)-(\d+)-", p.name)
            if not m or m.group(1) != host or pid_alive(int(m.group(2))):
                continue
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            removed.append(p)
    return removed


@contextmanager
def atomic_file(final: Path, suffix: str = ""):
    """Yield a temporary file path beside ``final``; when the block ends without error it is
    renamed to ``final``. On any error (a full disk, Ctrl-C) it is removed, so neither a
    partial ``final`` nor the temporary file is left behind; a process killed outright (SIGKILL,
    the OOM killer) leaves its temporary, which the next write of ``final`` removes
    (:func:`remove_stale_temporaries`).

    Args:
        suffix: ending of the temporary name (for writers that infer the format from it).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(final)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(final.stem), suffix=suffix, dir=final.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        crash_point()
        os.replace(tmp, final)
        crash_point()
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def atomic_folder(final: Path, replace: bool = True):
    """Yield a fresh temporary folder beside ``final``; when the block ends without error it is
    renamed to ``final`` (replacing an existing one if ``replace``, else keeping the existing
    one, e.g. written by a concurrent process). On error it is removed: a half-written folder
    is never left where it would be read as whole. An existing ``final`` is first renamed aside
    (then deleted), so a kill at any moment leaves either the old folder or the new one whole,
    never a half-deleted one; leftovers of killed writers go with the next write.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(final)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(final.name), dir=final.parent))
    old = None
    try:
        yield tmp
        crash_point()
        if final.exists():
            if not replace:
                return
            old = Path(tempfile.mkdtemp(prefix=_temp_prefix(final.name), dir=final.parent))
            os.rename(final, old / "old")  # aside, whole; deleted below
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.exists():  # lost a race: another process published it first
                raise
        crash_point()
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def write_json_atomic(path: Path, obj) -> None:
    """Write ``obj`` as JSON to ``path`` through a temporary file and a rename."""
    with atomic_file(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through :func:`atomic_file`: a reader (or a process
    killed mid-write) sees the old file or the new one whole, never a truncated one."""
    with atomic_file(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")


def record_packaged_file(path: Path, key: str, superseded: Optional[Callable[[str], bool]] = None, **meta) -> dict:
    """Name the file ``path`` in its folder's ``MANIFEST.json`` under cache key ``key``, with its
    SHA-256 and ``meta`` (written atomically): what :func:`packaged_file` reads and checks. Other
    entries stay, except those whose key ``superseded`` accepts: they are removed with their files.
    Returns the manifest as written."""
    folder = Path(path).parent
    man_path = folder / "MANIFEST.json"
    man = json.loads(man_path.read_text()) if man_path.exists() else {}
    for old in [k for k in man if k != key and superseded is not None and superseded(k)]:
        (folder / man.pop(old)["file"]).unlink(missing_ok=True)
    man[key] = {"file": Path(path).name, "sha256": hashlib.sha256(Path(path).read_bytes()).hexdigest(), **meta}
    write_json_atomic(man_path, man)
    return man


#: ``(path, size, mtime_ns) -> sha256`` of the shipped files already checked in this process: a
#: file is hashed again only when its size or modification time changed (hashing a shipped trace
#: file on every call cost milliseconds per env construction)
_CHECKED: dict[tuple[str, int, int], str] = {}


def _sha256(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _CHECKED:
        _CHECKED[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return _CHECKED[key]


def packaged_file(folder: Path, key: str, what: str) -> Optional[Path]:
    """The file a package ships for cache key ``key`` in ``folder``, if its ``MANIFEST.json`` names
    one (``{key: {"file": name, "sha256": hex}}``) and its checksum matches; a missing file or a
    mismatch warns (naming ``what`` it is and that it will be rebuilt) and gives ``None``, so a
    damaged artefact is rebuilt, never trusted. A file's checksum is computed once per process
    and file state (size, modification time)."""
    man = Path(folder) / "MANIFEST.json"
    if not man.exists():
        return None
    entry = json.loads(man.read_text()).get(key)
    if entry is None:
        return None
    path = Path(folder) / entry["file"]
    if not path.exists() or _sha256(path) != entry["sha256"]:
        warnings.warn(f"Shipped {what} {path} is missing or fails its checksum; rebuilding it.")
        return None
    return path
