"""lede's Minari store: dataset ids, the step-info format, partial folders, atomic publication
into place, and reference scores. Collection (:mod:`agents.collect`) and the dataset commands
(:mod:`agents.datasets_tool`: list, validate, merge, publish) both use it.

Ids follow ``lede/<model>/<prompt-set>-<policy-mix>-v<N>``; a shard ``k/n`` of a collection is the
dataset ``lede/<model>/<prompt-set>-<policy-mix>-shard<k>of<n>-v<N>`` (:func:`shard_dataset_id`).

A dataset is written under a temporary id, ``<ns>/partial-<host>-<pid>-<name>-v<N>``
(:func:`partial_id`), validated, and renamed into place when whole (:func:`move_into_place`, one
``os.rename``), so an interrupted collection or merge never leaves a dataset ``minari.load_dataset``
would read as complete; :func:`writing_partial` removes the temporary folder whatever happens,
and :func:`clean_stale_partials` removes those left by a killed process (same host, process gone).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from lede_env.storage import crash_point, host_tag, pid_alive

ID_RE = re.compile(r"^lede/[-_\w]+/[-_\w]+-v\d+$")  # Minari ids allow no dots
PARTIAL_PREFIX = "partial-"

#: per-step infos every dataset records (Minari ``infos``; the same keys at every step, so
#: Minari's known pitfalls with keys that vary between steps cannot arise): what each round did.
#: Index 0 is the reset (no round: -1 in the round fields, cost 0, the 1 token of the prefill).
STEP_INFO_KEYS = {"action": np.int64, "exit_layer": np.int64, "draft_len": np.int64, "accepted": np.int64,
                  "emitted": np.int64, "n_verify": np.int64, "cost": np.float64, "tokens_generated": np.int64}


def minari_root() -> Path:
    """Minari's local datasets folder (``$MINARI_DATASETS_PATH`` or ``~/.minari/datasets``)."""
    from minari.storage.datasets_root_dir import get_dataset_path

    return Path(get_dataset_path())


# ---- ids ------------------------------------------------------------------------------------
def check_dataset_id(dataset_id: str) -> None:
    """Check ``dataset_id`` is ``lede/<model>/<prompt-set>-<policy-mix>-v<N>``.

    Raises:
        ValueError: it is not (the message shows the expected form).
    """
    if not isinstance(dataset_id, str) or not ID_RE.match(dataset_id) or is_partial(dataset_id):
        raise ValueError(f"Dataset id {dataset_id!r} is not of the form lede/<model>/<prompt-set>-<policy-mix>-v<N> "
                         "(e.g. lede/smollm2-135m-instruct/humaneval-mixed-v0): letters, digits, '-' and '_' only "
                         f"(Minari allows no '.': Llama-3.2-1B -> Llama-3_2-1B), names not starting with "
                         f"{PARTIAL_PREFIX!r}.")


def dataset_model_name(name: str) -> str:
    """The ``<model>`` part of a dataset id for a model name or path (not a cache key: that is
    :func:`lede_env.model.model_slug`): its last path component,
    lower-cased, with every character Minari refuses replaced (``meta-llama/Llama-3.2-1B`` ->
    ``llama-3_2-1b``)."""
    base = str(name).rstrip("/").rpartition("/")[2].lower().replace(".", "_")
    return re.sub(r"[^a-z0-9_-]", "-", base) or "model"


def shard_dataset_id(dataset_id: str, k: int, n: int) -> str:
    """The id of shard ``k`` of ``n`` of ``dataset_id``: ``.../<name>-shard<k>of<n>-v<N>``."""
    head, _, ver = dataset_id.rpartition("-v")
    return f"{head}-shard{k}of{n}-v{ver}"


def is_partial(dataset_id: str) -> bool:
    """True for the temporary id of a dataset still being written (or left by a killed process)."""
    return dataset_id.rpartition("/")[2].startswith(PARTIAL_PREFIX)


def check_new(dataset_id: str, root: Optional[Path] = None) -> None:
    """Check no local dataset ``dataset_id`` exists yet (under ``root``, default :func:`minari_root`).

    Raises:
        ValueError: it exists (the message says how to choose a new version or delete it).
    """
    root = Path(root or minari_root())
    if (root / dataset_id).exists():
        raise ValueError(f"Dataset {dataset_id!r} already exists under {root}: choose a new version "
                         f"(-vN) or delete it (`minari delete {dataset_id}`).")


# ---- partial folders and publication into place ------------------------------------------------
def partial_id(dataset_id: str) -> str:
    """``<ns>/partial-<host>-<pid>-<name>-v<N>``: where a dataset is written before it is whole."""
    ns, _, name = dataset_id.rpartition("/")
    base, _, ver = name.rpartition("-v")
    tmp = f"{PARTIAL_PREFIX}{host_tag()}-{os.getpid()}-{base}-v{ver}"
    return f"{ns}/{tmp}" if ns else tmp


def clean_stale_partials(root: Optional[Path] = None) -> list[str]:
    """Remove ``partial-<host>-<pid>-*`` dataset folders of this host whose process has ended
    (a collection or merge that was killed). Folders of live processes and of other hosts
    (a shared folder) are kept.

    Returns:
        The relative paths removed.
    """
    root = Path(root or minari_root())
    host, removed = host_tag(), []
    if not root.exists():
        return removed
    for p in root.rglob(f"{PARTIAL_PREFIX}*"):
        if not p.is_dir():
            continue
        m = re.match(rf"^{PARTIAL_PREFIX}([A-Za-z0-9]+)-(\d+)-", p.name)
        if m and m.group(1) == host and int(m.group(2)) != os.getpid() and not pid_alive(int(m.group(2))):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(str(p.relative_to(root)))
    return removed


@contextmanager
def writing_partial(dataset_id: str, root: Optional[Path] = None) -> Iterator[str]:
    """Within this block a dataset is written under its temporary id (yielded,
    :func:`partial_id`); the block ends with :func:`move_into_place` once the data are whole and
    valid. On the way out the temporary folder is removed if it is still there (an error or an
    interrupt: nothing readable is left behind).
    """
    root = Path(root or minari_root())
    tmp_id = partial_id(dataset_id)
    tmp_path = root / tmp_id
    try:
        yield tmp_id
    finally:
        if tmp_path.exists():
            shutil.rmtree(tmp_path, ignore_errors=True)


def move_into_place(tmp_id: str, dataset_id: str, root: Optional[Path] = None, extra: Optional[dict] = None) -> None:
    """Publish a whole dataset written under ``tmp_id``: fix the id in its metadata (adding
    ``extra``), then rename its folder to ``dataset_id`` in one ``os.rename`` (a killed process
    leaves it partial or whole; the kill test stops the process at each
    :func:`lede_env.storage.crash_point`)."""
    root = Path(root or minari_root())
    tmp_path, final_path = root / tmp_id, root / dataset_id
    meta = tmp_path / "data" / "metadata.json"
    m = json.loads(meta.read_text())
    m["dataset_id"] = dataset_id
    m.update(extra or {})
    meta.write_text(json.dumps(m))
    final_path.parent.mkdir(parents=True, exist_ok=True)
    crash_point()
    os.rename(tmp_path, final_path)
    crash_point()


# ---- metadata -------------------------------------------------------------------------------
def reference_returns(env) -> tuple[np.ndarray, np.ndarray]:
    """Per-episode undiscounted returns of always-AR and of the hindsight oracle on every
    playable trace of a trace env (``(P,)`` each; each episode reset with ``seed=0``), both
    played under their own rules (:meth:`lede_env.env.LEDEEnv.playing`: neither reads
    observations, so neither is charged the feature/policy overhead; AR drafts nothing): the 0
    and 100 of :mod:`agents.scores`."""
    from lede_env.episodes import play_episode
    from lede_env.policies import StaticPolicy

    u = env.unwrapped
    out = []
    for pol in (StaticPolicy(0), None):  # always-AR, then the oracle (None)
        with u.playing(pol):
            out.append(np.array([play_episode(u, pol, seed=0, options={"prompt_index": i}).ret for i in u.playable]))
    return out[0], out[1]


def reference_scores(env, best_seen: Optional[dict] = None) -> tuple[float, float]:
    """Mean undiscounted return of always-AR (``ref_min_score``) and of the oracle
    (``ref_max_score``) over the env's traces, in its reward mode (:func:`reference_returns`), so
    that ``100 * minari.get_normalized_score(dataset, R)`` is lede's normalized score of a mean
    return ``R`` on the dataset's env (:mod:`agents.scores`).

    Live backend (no oracle): ``ref_max_score`` is the mean over prompts of the larger of the
    always-AR return and ``best_seen[prompt_index]`` (the best collected return on it, if any).
    """
    from lede_env.episodes import play_episode
    from lede_env.live_env import LiveEnv
    from lede_env.policies import StaticPolicy

    u = env.unwrapped
    if isinstance(u, LiveEnv):
        mins, maxs = [], []
        for i in u.playable:
            with u.playing(StaticPolicy(0)):
                ret = play_episode(u, StaticPolicy(0), seed=0, options={"prompt_index": i}).ret
            mins.append(ret)
            maxs.append(max(ret, (best_seen or {}).get(i, -np.inf)))
        return float(np.mean(mins)), float(np.mean(maxs))
    ar, oracle = reference_returns(env)
    return float(np.mean(ar)), float(np.mean(oracle))


def describe_collection(collection: dict, dataset_id: str) -> str:
    """The dataset description: the env, then what was collected (from the ``lede_collection``
    metadata entry)."""
    c = collection
    part = "" if not c.get("shard") else f" Shard {c['shard'][0]}/{c['shard'][1]} of the collection."
    merged = "" if not c.get("merged_from") else f" Merged from {', '.join(c['merged_from'])}."
    return (f"{c['env']} {c['episode_indices']} episodes (of a collection of {c['episodes']}, seed {c['seed']}, "
            f"episode i drawn from default_rng([seed, i])); behaviour episodes {c['behaviour_counts']} from the "
            f"mixture {c['mixture']}, oracle epsilon {c['oracle_epsilon']}.{part}{merged}")


# ---- files another process holds ----------------------------------------------------------------
class DatasetBusyError(OSError):
    """A dataset's HDF5 file is locked by another process that has it open for writing (HDF5's
    file locking refuses readers then: h5py #1722, PyTables #888). The message names the file,
    the process and the fix."""


def is_lock_error(e: BaseException) -> bool:
    """Whether ``e`` is HDF5 refusing to open a file another process holds locked."""
    return isinstance(e, OSError) and "unable to lock file" in str(e)


def holders(path: "str | Path") -> list[str]:
    """The processes of this machine that have ``path`` open, as ``"pid N (command line)"``
    (read from ``/proc``; empty where that cannot be read, e.g. off Linux)."""
    target = os.path.realpath(path)
    out = []
    for proc in Path("/proc").glob("[0-9]*"):
        if proc.name == str(os.getpid()):
            continue
        try:
            if not any(os.path.realpath(fd) == target for fd in (proc / "fd").iterdir()):
                continue
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:  # (gone, or not ours to read)
            continue
        out.append(f"pid {proc.name} ({cmd[:120]})")
    return out


def busy_error(path: "str | Path", what: str) -> DatasetBusyError:
    """The one-line error for ``what`` (e.g. ``"dataset 'lede/x/y-v0'"``) whose HDF5 file ``path``
    another process holds locked, naming that process where it can be found."""
    who = holders(path)
    by = f" by {', '.join(who)}" if who else " by another process"
    return DatasetBusyError(f"{what} is being written{by} ({path} is locked): wait for it to finish, or stop "
                            "it; a dataset is readable once its writer has closed it.")


def check_readable(dataset_id: str, root: Optional[Path] = None) -> None:
    """Raise :class:`DatasetBusyError` if another process holds the HDF5 file of the local
    dataset ``dataset_id`` open for writing (nothing is read or changed)."""
    import h5py

    path = Path(root or minari_root()) / dataset_id / "data" / "main_data.hdf5"
    if not path.exists():
        return
    try:
        h5py.File(path, "r").close()
    except OSError as e:
        if is_lock_error(e):
            raise busy_error(path, f"dataset {dataset_id!r}") from None
        raise
