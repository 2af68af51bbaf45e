"""Local Minari datasets of lede: list, show, validate, merge shards, publish.

The ``lede dataset`` commands (``agents/cli_dataset.py``) wrap these functions. Ids, shard ids,
the step-info format, partial folders and the publication of a whole dataset into place are
:mod:`agents.store`'s (shared with collection); :func:`merge` combines the shards of a collection
(:func:`agents.store.shard_dataset_id`) into the dataset of the plain id.

Folders named ``partial-*`` hold datasets being written (see :mod:`agents.store`); they are
never listed here and are removed by :func:`agents.store.clean_stale_partials` once their
process is gone.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from .store import (STEP_INFO_KEYS, check_dataset_id, check_new, clean_stale_partials, describe_collection,
                    is_partial, minari_root, move_into_place, reference_scores, writing_partial)

REWARD_RTOL, REWARD_ATOL = 1e-5, 1e-6
# minari's remote kinds; "gcs://" is accepted as another name for minari's "gcp://" (Google Cloud Storage)
_REMOTE_ALIASES = {"gcs": "gcp"}


class DatasetInvalid(ValueError):
    """A dataset failed :func:`validate`; ``problems`` lists every defect found."""

    def __init__(self, dataset_id: str, problems: list[str]):
        self.dataset_id, self.problems = dataset_id, list(problems)
        shown = "\n  - ".join(self.problems[:20])
        more = f"\n  ... and {len(self.problems) - 20} more" if len(self.problems) > 20 else ""
        super().__init__(f"Dataset {dataset_id!r} is invalid ({len(self.problems)} problem(s)):\n  - {shown}{more}")


class PublishError(RuntimeError):
    """Publishing could not start or failed (no remote, no credentials, no network, id taken)."""


# ---- local datasets -------------------------------------------------------------------------
def load(dataset_id: str):
    """``minari.load_dataset`` with an error that names the fix.

    Raises:
        FileNotFoundError: no whole local dataset ``dataset_id`` (``lede dataset list`` shows them).
        agents.store.DatasetBusyError: another process holds its file open for writing (named).
    """
    import minari

    from .store import check_readable

    if is_partial(dataset_id):
        raise FileNotFoundError(f"{dataset_id!r} is an unfinished (partial) dataset, not a dataset.")
    check_readable(dataset_id)
    try:
        return minari.load_dataset(dataset_id)
    except FileNotFoundError:
        raise FileNotFoundError(f"No local dataset {dataset_id!r} under {minari_root()}: `lede dataset list` shows "
                                "the local ones (MINARI_DATASETS_PATH selects the folder).") from None


def list_datasets() -> dict[str, dict]:
    """Whole local datasets: id -> ``{"episodes", "steps", "size_mb", "ref_min_score",
    "ref_max_score", "author"}``. Partial (unfinished) datasets are left out."""
    import minari

    out = {}
    for ds_id, m in minari.list_local_datasets().items():
        if is_partial(ds_id):
            continue
        out[ds_id] = {"episodes": int(m.get("total_episodes", 0)), "steps": int(m.get("total_steps", 0)),
                      "size_mb": m.get("dataset_size"), "ref_min_score": m.get("ref_min_score"),
                      "ref_max_score": m.get("ref_max_score"), "author": sorted(m.get("author", []))}
    return out


def show(dataset_id: str) -> dict:
    """Metadata summary of a local dataset (JSON-serialisable): counts, size (MB), authors, code
    permalink, description, requirements, reference scores, env spec (id, entry point, kwargs;
    the cost profile summarised), spaces, how it was collected or merged.

    Raises:
        FileNotFoundError: no such local dataset.
    """
    ds = load(dataset_id)
    m = ds.storage.metadata
    spec = ds.spec.env_spec
    env = None
    if spec is not None:
        kw = dict(spec.kwargs)
        if isinstance(kw.get("cost_profile"), dict):
            p = kw["cost_profile"]
            kw["cost_profile"] = f"<{p.get('source')} profile, {p.get('num_layers')} layers>"
        env = {"id": spec.id, "entry_point": spec.entry_point, "kwargs": kw}
    return {
        "dataset_id": dataset_id, "episodes": ds.total_episodes, "steps": ds.total_steps,
        "size_mb": m.get("dataset_size"), "minari_version": m.get("minari_version"),
        "author": sorted(m.get("author", [])), "code_permalink": m.get("code_permalink"),
        "algorithm_name": m.get("algorithm_name"), "description": m.get("description"),
        "requirements": m.get("requirements"), "ref_min_score": m.get("ref_min_score"),
        "ref_max_score": m.get("ref_max_score"), "env_spec": env,
        "observation_space": repr(ds.observation_space), "action_space": repr(ds.action_space),
        "collection": m.get("lede_collection"),
    }


# ---- validation -----------------------------------------------------------------------------
def _leaves(x, prefix=""):
    if isinstance(x, dict):
        for k, v in x.items():
            yield from _leaves(v, f"{prefix}{k}.")
    else:
        yield prefix.rstrip("."), np.asarray(x)


def _obs_at(obs, t):
    return {k: v[t] for k, v in obs.items()} if isinstance(obs, dict) else obs[t]


def _same_obs(a, b) -> bool:
    la, lb = dict(_leaves(a)), dict(_leaves(b))
    return la.keys() == lb.keys() and all(np.allclose(la[k], lb[k], rtol=1e-5, atol=1e-6) for k in la)


def collection_costs(dataset, env=None) -> str:
    """How the dataset's round costs were made: ``"wallclock"`` (measured times of the live
    backend, ``cost="wallclock"``) or ``"profile"`` (the cost profile, deterministic).

    Read from the stored env spec's ``cost``, else the collection's env description (datasets of
    in-memory envs have no spec), else ``env``'s ``cost`` attribute; ``"profile"`` when none says.
    """
    spec = dataset.spec.env_spec
    if spec is not None and spec.kwargs.get("cost"):
        return str(spec.kwargs["cost"])
    desc = str((dataset.storage.metadata.get("lede_collection") or {}).get("env", ""))
    if "wall-clock costs" in desc:
        return "wallclock"
    if "cost-profile costs" in desc or "trace backend" in desc:
        return "profile"
    return str(getattr(getattr(env, "unwrapped", None), "cost", "profile") or "profile")


#: what validation cannot re-compute for a dataset of measured (wall-clock) round costs, and why
WALLCLOCK_NOTE = ("rewards and infos['cost'] not re-computed by replay: they are measured wall-clock times "
                  "(cost='wallclock'), which no replay reproduces; each reward is checked against its round's "
                  "stored tokens and measured cost instead")


def validate(dataset, env=None, replay: bool = True, max_problems: int = 100,
             require_env_spec: bool = True, notes: Optional[list[str]] = None) -> list[str]:
    """Check a dataset and list its defects (empty list = valid).

    Checks: the metadata (id form, author, code permalink, description, requirements, env spec,
    ``ref_min_score <= ref_max_score``, episode and step totals); per episode, T+1 observations
    for T actions, T rewards/terminations/truncations, actions in the action space, exactly one
    episode end (termination or truncation) and only at the last step, the per-step infos
    (:data:`agents.store.STEP_INFO_KEYS`, T+1 entries, counters that add up); the dataset's
    spaces equal the env's; and, with ``replay``, that replaying each episode's stored seed,
    options and actions in the env gives the stored observations, rewards (rtol 1e-5), infos and
    episode ends.

    Datasets with wall-clock costs (``cost="wallclock"``, :func:`collection_costs`) are checked
    as far as they can be: everything above but the measured quantities, whose replay gives other
    times (rewards and ``infos["cost"]``); each stored reward must instead equal the env's reward
    of its round's stored tokens and measured cost. Tokens, accepted counts and observations are
    replayed exactly under greedy decoding, and under sampling from the stored seed on a machine
    that computes the same logits (the collecting one). What was skipped, and why, goes to
    ``notes``.

    Args:
        dataset: a ``MinariDataset`` or a local dataset id.
        env: the env to replay in; ``None`` recovers it from the stored env spec (which, for the
            embedded backend, loads the model) when ``replay``.
        replay: re-compute rewards by replay (needs an env).
        max_problems: stop after this many problems.
        require_env_spec: a missing env spec is a problem (off for datasets of envs that have
            no spec, e.g. built around an in-memory test model).
        notes: if given, filled with the checks skipped and why (one line each).

    Raises:
        FileNotFoundError: ``dataset`` is an id with no local dataset.
    """
    import minari

    # re-opened: a MinariDataset object keeps the env spec it was opened with
    ds = load(dataset) if isinstance(dataset, str) else minari.MinariDataset(dataset.storage.data_path)
    problems: list[str] = []
    notes = [] if notes is None else notes

    def bad(msg: str) -> bool:
        problems.append(msg)
        return len(problems) >= max_problems

    measured = collection_costs(ds, env) == "wallclock"
    if measured:
        notes.append(WALLCLOCK_NOTE)
    if not replay:
        notes.append("replay skipped (replay=False, --no-replay, or no env to replay in): observations, rewards "
                     "and infos are checked for structure only, not re-computed in the env")
    m = ds.storage.metadata
    for msg in _metadata_problems(ds, require_env_spec):
        bad(msg)
    env = _replay_env(ds, env, replay, bad)
    n_actions = int(ds.action_space.n)
    obs_shapes = {k: s.shape for k, s in getattr(ds.observation_space, "spaces", {}).items()}
    N = ds.storage.total_episodes
    ep_metas = list(ds.storage.get_episode_metadata(range(N)))
    steps = 0
    for i, (ep, em) in enumerate(zip(ds.storage.get_episodes(range(N)), ep_metas)):
        acts = np.asarray(ep["actions"])
        T = int(acts.shape[0])
        steps += T
        where = f"episode {i}"
        if T == 0 and bad(f"{where}: no steps"):
            break
        # lazily: an episode is replayed only while problems may still be added
        for msg in _episode_problems(where, ep, em, acts, n_actions, obs_shapes, env, measured):
            if bad(msg):
                return problems
    if m.get("total_episodes") != N or m.get("total_steps") != steps:
        bad(f"metadata: totals {m.get('total_episodes')} episodes / {m.get('total_steps')} steps, data hold "
            f"{N} / {steps}")
    return problems


def _metadata_problems(ds, require_env_spec: bool) -> list[str]:
    """The defects of a dataset's metadata (id form, required keys, reference scores in order,
    env spec), as :func:`validate` lists them."""
    problems = []
    m = ds.storage.metadata
    ds_id = m.get("dataset_id", "")
    if not is_partial(ds_id):
        try:
            check_dataset_id(ds_id)
        except ValueError as e:
            problems.append(str(e))
    for key in ("author", "code_permalink", "description", "requirements", "ref_min_score", "ref_max_score"):
        if m.get(key) in (None, "", [], set()):
            problems.append(f"metadata: no {key!r}")
    lo, hi = m.get("ref_min_score"), m.get("ref_max_score")
    if lo is not None and hi is not None and not float(lo) <= float(hi):
        problems.append(f"metadata: ref_min_score {lo} > ref_max_score {hi} (always-AR must not beat the oracle)")
    if ds.spec.env_spec is None and require_env_spec:
        problems.append("metadata: no env spec (recover_environment() cannot rebuild the env)")
    return problems


def _replay_env(ds, env, replay: bool, bad):
    """The env :func:`validate` replays the episodes in: ``env``, else (with ``replay``) the one
    recovered from the stored spec; ``None`` when there is none, or when its spaces differ from
    the dataset's (replaying would only repeat the mismatch). Each failure goes to ``bad(msg)``."""
    if replay and env is None:
        try:
            env = ds.recover_environment()
        except Exception as e:  # noqa: BLE001 - reported, not raised
            bad(f"env: cannot recover it from the stored spec ({type(e).__name__}: {e}); pass an env or use replay=False")
    if env is None:
        return None
    mismatches = []
    if ds.observation_space != env.observation_space:
        mismatches.append(f"spaces: dataset observation space {ds.observation_space} != env's {env.observation_space}")
    if ds.action_space != env.action_space:
        mismatches.append(f"spaces: dataset action space {ds.action_space} != env's {env.action_space}")
    for msg in mismatches:
        bad(msg)
    return None if mismatches else env


def _episode_problems(where: str, ep, em, acts: np.ndarray, n_actions: int, obs_shapes: dict, env,
                      measured: bool) -> Iterator[str]:
    """The defects of one episode (``ep`` its data, ``em`` its metadata), in the order
    :func:`validate` reports them: array lengths, observation shapes and actions, then (when
    those hold) its per-step infos, its end, and its replay in ``env`` (``None``: not replayed).
    A generator: the episode is replayed only if the caller asks for the problems past the others."""
    T = len(acts)
    shape_problems = _shape_problems(ep, acts, n_actions, obs_shapes)
    for msg in shape_problems:
        yield f"{where}: {msg}"
    if shape_problems:
        return
    msg = _infos_problem(ep.get("infos"), acts)
    if msg:
        yield f"{where}: {msg}"
        return
    te, tr = np.asarray(ep["terminations"], bool), np.asarray(ep["truncations"], bool)
    ends = te | tr
    if not ends[-1]:
        yield f"{where}: the last step is neither terminated nor truncated"
        return
    if ends[:-1].any():
        yield f"{where}: the episode ends at step {int(np.argmax(ends))} but goes on to step {T - 1}"
        return
    if te[-1] and tr[-1]:
        yield f"{where}: the last step is both terminated and truncated"
    if env is None:
        return
    opts = em.get("options")
    if not isinstance(opts, dict) or "prompt_index" not in opts:
        yield f"{where}: no options['prompt_index'] stored: it cannot be replayed"
        return
    msg = _replay_mismatch(env, em.get("seed"), {k: int(v) for k, v in opts.items()}, ep, acts, te, tr, measured)
    if msg:
        yield f"{where} (seed {em.get('seed')}, prompt {opts['prompt_index']}): {msg}"


def _shape_problems(ep, acts: np.ndarray, n_actions: int, obs_shapes: dict) -> list[str]:
    """What is wrong with the lengths and shapes of one episode's arrays (one reward, termination
    and truncation per action, T+1 observations of the space's shapes) and its actions (in the
    action space)."""
    T = len(acts)
    problems = []
    for key in ("rewards", "terminations", "truncations"):
        if len(ep[key]) != T:
            problems.append(f"{len(ep[key])} {key} for {T} actions (need one per action)")
    wrong_len = {}
    for key, arr in _leaves(ep["observations"]):
        if arr.shape[0] != T + 1:
            wrong_len[key] = arr.shape[0]
        elif key in obs_shapes and tuple(arr.shape[1:]) != tuple(obs_shapes[key]):
            problems.append(f"observations[{key}] shape {arr.shape[1:]} != space's {obs_shapes[key]}")
    if wrong_len:
        counts = ", ".join(f"{n} {k}" for k, n in wrong_len.items())
        problems.append(f"observations ({counts}) for {T} actions (need T+1 = {T + 1}: the final observation "
                        "is missing, or one is extra)")
    out = (acts < 0) | (acts >= n_actions)
    if out.any():
        j = int(np.argmax(out))
        problems.append(f"action {acts[j]} at step {j} outside the action space 0..{n_actions - 1}")
    return problems


def _infos_problem(infos, acts: np.ndarray) -> Optional[str]:
    """What is wrong with one episode's per-step infos (``None``: nothing): the fixed keys of
    :data:`agents.store.STEP_INFO_KEYS`, T+1 entries each, the stored actions, counters that
    add up (accepted <= drafted, tokens_generated grows by what each round emitted)."""
    if not infos:
        return "no per-step infos (datasets record what each round did since the step-info format: recollect it)"
    if set(infos) != set(STEP_INFO_KEYS):
        return f"infos keys {sorted(infos)} != {sorted(STEP_INFO_KEYS)}"
    T = len(acts)
    if any(len(np.asarray(v)) != T + 1 for v in infos.values()):
        return f"infos hold {sorted({len(np.asarray(v)) for v in infos.values()})} entries for {T} actions (need T+1)"
    f = {k: np.asarray(v) for k, v in infos.items()}
    if not np.array_equal(f["action"][1:], acts):
        return "infos['action'] differ from the stored actions"
    if (f["accepted"][1:] > f["draft_len"][1:]).any() or (f["emitted"][1:] < 1).any():
        return "infos: a round accepted more tokens than it drafted, or emitted none"
    if not np.array_equal(np.diff(f["tokens_generated"]), f["emitted"][1:]):
        return "infos: tokens_generated does not grow by each round's emitted tokens"
    return None


def _replay_mismatch(env, seed, options, ep, acts, te, tr, measured: bool = False) -> Optional[str]:
    """The first difference between an episode's stored data and its replay in ``env`` (``None``:
    none). ``measured``: the stored costs are wall-clock times: rewards and ``infos["cost"]`` are
    not compared with the replay's; each reward must equal the env's reward of the stored round
    (its stored emitted tokens and measured cost)."""
    try:
        obs, _ = env.reset(seed=None if seed is None else int(seed), options=options)
    except Exception as e:  # noqa: BLE001
        return f"reset failed ({e})"
    if not _same_obs(obs, _obs_at(ep["observations"], 0)):
        return "observation 0 differs from the env's"
    infos = ep.get("infos") or {}
    for t, a in enumerate(acts):
        obs, r, e_te, e_tr, info = env.step(int(a))
        if measured:  # the reward of the stored round, not of the replay's timing
            r = env.unwrapped.round_reward(int(np.asarray(infos["emitted"])[t + 1]),
                                           float(np.asarray(infos["cost"])[t + 1]))
        if not np.isclose(r, ep["rewards"][t], rtol=REWARD_RTOL, atol=REWARD_ATOL):
            what = "its stored round's reward is" if measured else "the env gives"
            return f"reward {float(ep['rewards'][t]):.6g} at step {t}, {what} {r:.6g} for action {int(a)}"
        for k, stored in infos.items():
            if measured and k == "cost":
                continue
            got = info["tokens_generated"] if k == "tokens_generated" else info["round"].get(k)
            if got is None or not np.isclose(float(np.asarray(stored)[t + 1]), float(got), rtol=REWARD_RTOL,
                                             atol=REWARD_ATOL):
                return f"infos[{k!r}] at step {t} is {np.asarray(stored)[t + 1]}, the env gives {got}"
        if (bool(e_te), bool(e_tr)) != (bool(te[t]), bool(tr[t])):
            return (f"step {t}: stored terminated/truncated {bool(te[t])}/{bool(tr[t])}, the env gives "
                    f"{bool(e_te)}/{bool(e_tr)}")
        if not _same_obs(obs, _obs_at(ep["observations"], t + 1)):
            return f"observation {t + 1} differs from the env's"
        if (e_te or e_tr) and t < len(acts) - 1:
            return f"the env ends the episode at step {t}, the data go on"
    return None


def check(dataset, env=None, replay: bool = True, require_env_spec: bool = True,
          notes: Optional[list[str]] = None) -> None:
    """:func:`validate`, raising :class:`DatasetInvalid` (a ``ValueError``) listing every problem;
    ``notes`` as in :func:`validate`."""
    ds = load(dataset) if isinstance(dataset, str) else dataset
    problems = validate(ds, env, replay, require_env_spec=require_env_spec, notes=notes)
    if problems:
        raise DatasetInvalid(ds.storage.metadata.get("dataset_id", "?"), problems)


# ---- merge ----------------------------------------------------------------------------------
def merge(ids: Sequence[str], new_id: str, env=None, validate_replay: bool = True,
          notes: Optional[list[str]] = None):
    """Combine datasets (typically the shards of one collection) into ``new_id`` with
    ``minari.combine_datasets``, then fix what it drops or leaves stale: each episode's options
    (``prompt_index``), episode index and behaviour; the description, algorithm name, code
    permalink, requirements; the reference scores (carried when the sources agree, re-computed
    when ``env`` is given) and the ``lede_collection`` entry (summed counts, ``merged_from``).
    The result is written under a temporary id, validated and renamed into place.

    The merged metadata's ``combined_datasets`` is left empty (the sources go to
    ``lede_collection.merged_from``): Minari's upload and download follow ``combined_datasets``
    recursively, which would publish every shard next to the merged copy of their episodes.

    Args:
        ids: local dataset ids, in order (episodes are concatenated in this order).
        new_id: ``lede/<model>/<prompt-set>-<policy-mix>-v<N>``, not existing yet.
        env: replay env for validation and reference scores (``None``: recovered from the spec
            when ``validate_replay``, else structural validation only).
        notes: if given, filled with what validation skipped and why (see :func:`validate`) and,
            for sources with wall-clock costs whose measured reference scores differ, how the
            merged ones were made (the mean of the sources').

    Returns:
        The merged ``minari.MinariDataset``.

    Raises:
        FileNotFoundError: a source id has no local dataset.
        ValueError: no sources, a repeated source, ``new_id`` malformed or existing, sources of
            different envs or collections (other seed, size, mixture), overlapping shards, or
            reference scores that disagree without an ``env`` to re-compute them.
        DatasetInvalid: the merged data fail validation (nothing is left behind).
    """
    import minari

    ids = list(ids)
    if not ids:
        raise ValueError("merge needs at least one source dataset id.")
    if len(set(ids)) != len(ids):
        raise ValueError(f"merge sources repeat an id: {ids}.")
    check_dataset_id(new_id)
    root = minari_root()
    check_new(new_id, root)
    srcs = [load(i) for i in ids]
    metas = [s.storage.metadata for s in srcs]
    ep_metas = _mergeable_episodes(ids, srcs, metas)
    notes = [] if notes is None else notes
    ref_min, ref_max = _merged_reference_scores(srcs, metas, env, notes)
    clean_stale_partials(root)
    with writing_partial(new_id, root) as tmp_id:
        _ensure_namespace(new_id)
        ds = minari.combine_datasets(srcs, tmp_id)
        # combine_datasets keeps seeds but not options nor our per-episode entries
        # combine_datasets loses each episode's seed and options (minari 0.5.4 reads the seed from
        # the episode data, where it is not) and our per-episode entries: copy them over
        flat = [{f"options/{k}": v for k, v in (em.get("options") or {}).items()} |
                {k: v for k, v in em.items() if k not in ("id", "options", "total_steps") and v is not None}
                for em in ep_metas]
        ds.storage.update_episode_metadata(flat, range(len(flat)))
        update = _merged_metadata(ids, new_id, metas, int(ds.total_episodes), ref_min, ref_max)
        ds.storage.update_metadata({k: v for k, v in update.items() if v is not None})
        has_spec = ds.spec.env_spec is not None
        check(minari.MinariDataset(ds.storage.data_path), env, replay=validate_replay and (env is not None or has_spec),
              require_env_spec=has_spec, notes=notes)
        move_into_place(tmp_id, new_id, root)
    return minari.load_dataset(new_id)


def _mergeable_episodes(ids: list[str], srcs: list, metas: list[dict]) -> list[dict]:
    """The episode metadata of the sources, in order, once checked that they can be merged: the
    same spaces, the same collection (when all have one) and no episode twice (``ValueError``
    otherwise, see :func:`merge`)."""
    for s, m in zip(srcs[1:], metas[1:]):
        if s.observation_space != srcs[0].observation_space or s.action_space != srcs[0].action_space:
            raise ValueError(f"{m['dataset_id']} has other spaces than {ids[0]}: they come from different envs.")
    cols = [m.get("lede_collection") for m in metas]
    if all(c is not None for c in cols):
        key = lambda c: (c["seed"], c["episodes"], json.dumps(c["mixture"], sort_keys=True), c["oracle_epsilon"], c["env"])  # noqa: E731
        if len({key(c) for c in cols}) > 1:
            raise ValueError("The sources come from different collections (seed, episodes, mixture, oracle epsilon or "
                             "env differ): merge shards of one collection, or give them one new description.")
    ep_metas = [dict(em) for s in srcs for em in s.storage.get_episode_metadata(range(s.total_episodes))]
    idx = [em.get("episode_index") for em in ep_metas]
    if all(i is not None for i in idx) and len(set(map(int, idx))) != len(idx):
        raise ValueError("The sources share episodes (the same episode_index twice): each shard must be merged once.")
    return ep_metas


def _merged_reference_scores(srcs: list, metas: list[dict], env, notes: list[str]) -> tuple:
    """``(ref_min, ref_max)`` of a merge: re-computed in ``env`` when given, else the sources'
    when they agree, else (sources with wall-clock costs) their mean, said in ``notes``.

    Raises:
        ValueError: the sources' scores differ or are missing, and there is no ``env``.
    """
    measured = all(collection_costs(s, env) == "wallclock" for s in srcs)
    refs = {(m.get("ref_min_score"), m.get("ref_max_score")) for m in metas}
    if env is not None:
        return reference_scores(env)
    if measured and len(refs) > 1 and all(None not in r for r in refs):
        # each source measured the same reference policies on the same prompts: average the measurements
        ref_min = float(np.mean([float(m["ref_min_score"]) for m in metas]))
        ref_max = float(np.mean([float(m["ref_max_score"]) for m in metas]))
        notes.append(f"reference scores: the sources' wall-clock measurements differ ({sorted(map(str, refs))}); "
                     f"the merged dataset holds their mean ({ref_min:.6g}, {ref_max:.6g})")
        return ref_min, ref_max
    if len(refs) != 1 or None in next(iter(refs)):
        raise ValueError(f"The sources' reference scores differ or are missing ({sorted(map(str, refs))}): "
                         "pass the env to re-compute them.")
    return next(iter(refs))


def _merged_metadata(ids: list[str], new_id: str, metas: list[dict], total_episodes: int, ref_min,
                     ref_max) -> dict:
    """The metadata a merge writes over ``combine_datasets``' (``None`` values: not written): the
    reference scores, the first source's permalink and requirements, and either the summed
    ``lede_collection`` with its description and algorithm name or a description of the merge."""
    m0 = metas[0]
    cols = [m.get("lede_collection") for m in metas]
    update = {"ref_min_score": ref_min, "ref_max_score": ref_max, "combined_datasets": [],
              "num_episodes_average_score": m0.get("num_episodes_average_score")}
    for k in ("code_permalink", "requirements"):
        if m0.get(k) is not None:
            update[k] = m0[k]
    if all(c is not None for c in cols):
        counts: dict = {}
        for c in cols:
            for k, v in c["behaviour_counts"].items():
                counts[k] = counts.get(k, 0) + int(v)
        col = dict(cols[0]) | {"shard": None, "episode_indices": total_episodes,
                               "behaviour_counts": counts, "merged_from": ids}
        update["lede_collection"] = col
        update["description"] = describe_collection(col, new_id)
        update["algorithm_name"] = "behaviour mixture: " + ", ".join(f"{k}={counts[k]}" for k in sorted(counts))
    else:
        update["description"] = (f"Merge of {', '.join(ids)} ({total_episodes} episodes). "
                                 + (m0.get("description") or ""))
        update["lede_collection"] = {"merged_from": ids}
        if m0.get("algorithm_name"):
            update["algorithm_name"] = m0["algorithm_name"]
    return update


def _ensure_namespace(dataset_id: str) -> None:
    from minari.dataset.minari_dataset import parse_dataset_id
    from minari.namespace import create_namespace, list_local_namespaces

    ns = parse_dataset_id(dataset_id)[0]
    if ns is not None and ns not in list_local_namespaces():
        create_namespace(ns)


# ---- publish --------------------------------------------------------------------------------
def _resolve_remote(remote: Optional[str]) -> tuple[str, str, str]:
    from minari.storage.remotes import _registry

    remote = remote or os.environ.get("MINARI_REMOTE")
    if not remote:
        raise PublishError("No remote to publish to: set MINARI_REMOTE (e.g. MINARI_REMOTE=hf://<user-or-org> for "
                           "Hugging Face, gcp://<bucket> for Google Cloud Storage) or pass --remote. Nothing was "
                           "uploaded.")
    kind, sep, name = remote.partition("://")
    kind = _REMOTE_ALIASES.get(kind, kind)
    if not sep or not name or kind not in _registry:
        raise PublishError(f"Remote {remote!r} is not KIND://NAME with KIND one of {sorted(_registry)} "
                           "(e.g. hf://my-org, gcp://my-bucket). Nothing was uploaded.")
    return f"{kind}://{name}", kind, name


def _credentials(kind: str, token: Optional[str]) -> tuple[Optional[str], str]:
    """(token, where it came from); ``(None, why)`` when the remote needs one and none is found."""
    if token:
        return token, "--token"
    if kind == "hf":
        if os.environ.get("HF_TOKEN"):
            return os.environ["HF_TOKEN"], "HF_TOKEN"
        try:
            from huggingface_hub import get_token

            t = get_token()
        except Exception:  # noqa: BLE001 - no hub, no token
            t = None
        return (t, "huggingface-cli login") if t else (None, "no Hugging Face token: run `huggingface-cli login` "
                                                             "or set HF_TOKEN")
    if kind == "gcp":
        p = os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
        if p and Path(p).is_file():
            return p, "GOOGLE_APPLICATION_CREDENTIALS"
        return None, ("no Google Cloud service-account key: set GOOGLE_APPLICATION_CREDENTIALS to its JSON file "
                      "or pass --token PATH")
    return None, "none needed"


def upload_plan(dataset_id: str, remote: str) -> list[dict]:
    """Files :func:`publish` uploads for ``dataset_id`` to ``remote``: ``[{"path", "remote_path",
    "bytes"}]`` (the dataset folder; namespace metadata files are uploaded by Minari only when
    the namespace is new on the remote)."""
    from minari.storage.datasets_root_dir import get_dataset_path

    folder = Path(get_dataset_path(dataset_id))
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return [{"path": str(p), "remote_path": f"{remote}/{dataset_id}/{p.relative_to(folder).as_posix()}",
             "bytes": p.stat().st_size} for p in files]


@contextmanager
def _env_var(name: str, value: str):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def publish(dataset_id: str, remote: Optional[str] = None, dry_run: bool = False, token: Optional[str] = None,
            env=None, replay: bool = True) -> dict:
    """Validate a local dataset and upload it with ``minari.upload_dataset`` to ``remote``
    (default ``$MINARI_REMOTE``: ``hf://<user-or-org>`` or ``gcp://<bucket>``).

    Everything that can fail before an upload is checked first: the remote, the credentials
    (``token``, else ``HF_TOKEN`` / the ``huggingface-cli login`` token, or
    ``GOOGLE_APPLICATION_CREDENTIALS``), the dataset (:func:`validate`), and that the remote is
    reachable and does not hold the id yet. Nothing is uploaded or changed until all pass.

    Args:
        remote: ``KIND://NAME``; ``gcs://`` is read as minari's ``gcp://``.
        dry_run: only check and return the plan (no credentials needed; the remote is not
            contacted).
        env: replay env for validation (``None``: recovered from the dataset's env spec).
        replay: validate by replay (see :func:`validate`).

    Returns:
        ``{"dataset_id", "remote", "files": upload_plan(...), "bytes", "credentials", "dry_run",
        "uploaded"}``.

    Raises:
        PublishError: no remote or a malformed one, no credentials, the remote unreachable or its
            client library missing, the id already on the remote, or the upload failed.
        DatasetInvalid: the dataset fails validation.
        FileNotFoundError: no such local dataset.
    """
    import minari
    from minari.storage.remotes import get_cloud_storage

    remote, kind, _ = _resolve_remote(remote)
    ds = load(dataset_id)
    check(ds, env, replay=replay)
    files = upload_plan(dataset_id, remote)
    tok, source = _credentials(kind, token)
    plan = {"dataset_id": dataset_id, "remote": remote, "files": files, "bytes": sum(f["bytes"] for f in files),
            "credentials": source, "dry_run": dry_run, "uploaded": False}
    if dry_run:
        return plan
    if tok is None and kind in ("hf", "gcp"):
        raise PublishError(f"Cannot publish to {remote}: {source}. Nothing was uploaded.")
    try:
        storage = get_cloud_storage(remote_path=remote, token=tok)
    except ImportError as e:
        raise PublishError(f"The client library for {remote} is missing ({e}). Nothing was uploaded.") from e
    try:
        taken = dataset_id in set(storage.list_datasets(prefix=dataset_id))
    except Exception as e:  # noqa: BLE001 - network, DNS, auth
        raise PublishError(f"Cannot reach {remote} ({type(e).__name__}: {e}); check the network and credentials. "
                           "Nothing was uploaded.") from e
    if taken:
        raise PublishError(f"{dataset_id} is already on {remote}: publish a new version (-vN). Nothing was uploaded.")
    try:
        with _env_var("MINARI_REMOTE", remote):  # minari.upload_dataset reads the remote from it
            minari.upload_dataset(dataset_id, tok)
    except Exception as e:  # noqa: BLE001
        raise PublishError(f"Uploading {dataset_id} to {remote} failed ({type(e).__name__}: {e}); the remote may "
                           "hold part of it: check it before retrying.") from e
    plan["uploaded"] = True
    return plan
