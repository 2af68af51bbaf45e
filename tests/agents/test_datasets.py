"""Minari datasets others can load, trust and publish: round trip with recover_environment,
validation of broken copies, shards merged = one collection, publish to a fake remote,
interrupted collections, sharded trace building, the ``lede dataset`` CLI (tiny model)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from agents import datasets_tool as dt
from agents import store
from agents.collect import CollectConfig, collect, env_spec_for
from agents.store import reference_scores
from lede_env.sharding import parse_shard, shard_indices

_TINY: dict = {}


def make_tiny_env(k_max: int = 4, max_new_tokens: int = 32, **ignored):
    """Entry point of the tiny env's EnvSpec: ``recover_environment()`` rebuilds the same env
    (same seeded tiny model, continuations, heads and analytic profile)."""
    from lede_env.costs import analytic_profile
    from lede_env.env import LEDEEnv
    from lede_env.exits import ExitHeads
    from lede_env.traces import build_traces
    from tests.conftest import make_tiny, tiny_continuations

    if not _TINY:
        b = make_tiny()
        heads = ExitHeads(b.stack, (1, 2, 3), "lens")
        _TINY.update(b=b, heads=heads, ts=build_traces(b, heads, tiny_continuations(b), progress=False),
                     prof=analytic_profile(b.stack, 4, None, False))
    return LEDEEnv.with_objects(trace_set=_TINY["ts"], profile=_TINY["prof"], eos_ids=_TINY["b"].eos_ids, k_max=k_max,
                   max_new_tokens=max_new_tokens, progress=False)


def make_tiny_live_env(cost: str = "wallclock", max_new_tokens: int = 8, reward_mode: str = "relative",
                       **ignored):
    """Entry point of a wall-clock (or profile-cost) live env on the tiny model and its prompts."""
    from lede_env.env import LEDEEnv

    make_tiny_env()  # the tiny model, heads and profile
    return LEDEEnv.with_objects(backend="live", bundle=_TINY["b"], heads=_TINY["heads"], profile=_TINY["prof"], k_max=4,
                   prompts=[t.prompt.tolist() for t in _TINY["ts"].traces], max_new_tokens=max_new_tokens,
                   cost=cost, reward_mode=reward_mode, progress=False)


def tiny_spec():
    from gymnasium.envs.registration import EnvSpec

    return EnvSpec(id="LEDE-Llama3-v0", entry_point="tests.agents.test_datasets:make_tiny_env",
                   kwargs={"k_max": 4, "max_new_tokens": 32})


@pytest.fixture(scope="module")
def env():
    return make_tiny_env()


@pytest.fixture(scope="module")
def good(env):
    ds = collect(env, CollectConfig(dataset_id="lede/tiny/rt-mixed-v0", episodes=6, seed=0), progress=False,
                 env_spec=tiny_spec())
    return ds


def episodes_of(ds):
    """(episode_index, seed, prompt_index, behaviour, actions, rewards) of every episode."""
    metas = ds.storage.get_episode_metadata(range(ds.total_episodes))
    return {(int(m["episode_index"]), int(m["seed"]), int(m["options"]["prompt_index"]), str(m["behaviour"]),
             tuple(int(a) for a in ep.actions), tuple(np.round(ep.rewards, 9)))
            for ep, m in zip(ds.iterate_episodes(), metas)}


# ---- round trip -----------------------------------------------------------------------------
def test_round_trip_and_recover_environment(good, env):
    import minari

    ds = minari.load_dataset("lede/tiny/rt-mixed-v0")
    m = ds.storage.metadata
    assert ds.total_episodes == 6
    assert m["author"] == {"lede"} and m["code_permalink"].startswith("https://")
    assert "minari==0.5.4" in m["requirements"] and any(r.startswith("gymnasium==") for r in m["requirements"])
    assert "6 episodes" in m["description"]
    lo, hi = reference_scores(env)
    assert (m["ref_min_score"], m["ref_max_score"]) == pytest.approx((lo, hi)) and hi > lo
    np.testing.assert_allclose(minari.get_normalized_score(ds, np.array([lo, hi])), [0.0, 1.0])
    assert sorted(int(e["episode_index"]) for e in ds.storage.get_episode_metadata(range(6))) == list(range(6))
    # recover_environment rebuilds the env from the stored spec; replaying the stored seed,
    # options and actions there gives the stored observations and rewards
    rec = ds.recover_environment()
    assert rec.unwrapped is not env and rec.observation_space == env.observation_space
    assert rec.action_space == env.action_space
    for ep, meta in zip(ds.iterate_episodes(), ds.storage.get_episode_metadata(ds.episode_indices)):
        obs, _ = rec.reset(seed=meta["seed"], options={"prompt_index": int(meta["options"]["prompt_index"])})
        np.testing.assert_allclose(obs["hidden"], ep.observations["hidden"][0])
        steps = [rec.step(int(a)) for a in ep.actions]
        np.testing.assert_allclose([s[1] for s in steps], ep.rewards, rtol=1e-6)
        # per-step infos: fixed keys, the reset first, then what each round did
        from agents.store import STEP_INFO_KEYS

        assert set(ep.infos) == set(STEP_INFO_KEYS) and all(len(v) == len(ep.actions) + 1 for v in ep.infos.values())
        assert ep.infos["action"][0] == -1 and ep.infos["tokens_generated"][0] == 1
        assert ep.infos["action"][1:].tolist() == ep.actions.tolist()
        for k in ("exit_layer", "draft_len", "accepted", "emitted", "n_verify"):
            assert ep.infos[k][1:].tolist() == [s[4]["round"][k] for s in steps]
        np.testing.assert_allclose(ep.infos["cost"][1:], [s[4]["round"]["cost"] for s in steps])
        assert ep.infos["tokens_generated"][-1] == steps[-1][4]["tokens_generated"]
    assert dt.validate(ds) == []  # env recovered from the spec


def test_env_spec_is_complete(env):
    """The stored kwargs fix the whole MDP (incl. the cost profile itself) and are LEDEEnv's."""
    import inspect

    from lede_env.costs import CostProfile
    from lede_env.env import LEDEEnv

    spec = env_spec_for(env, {"model": "some/model", "prompts": "humaneval[0:4]", "cost_profile": "measured"})
    kw = spec.kwargs
    assert (spec.id, spec.entry_point) == ("LEDE-Llama3-v0", "lede_env.env:LEDEEnv")
    assert kw["model"] == "some/model" and kw["prompts"] == "humaneval[0:4]"
    assert kw["exit_layers"] == [1, 2, 3] and kw["k_max"] == 4 and kw["max_new_tokens"] == 32
    assert kw["reward_mode"] == "relative" and kw["bonus"] is True and kw["reuse"] is True
    # the resolved lambda is stored, so a recovered env pays the same rewards without recomputing it
    assert kw["reward_lambda"] == env.unwrapped.reward_lambda >= 1.0
    assert kw["obs_kind"] == "full" and kw["stop_rule"] is None and kw["context_draft"] == 0
    assert CostProfile(**kw["cost_profile"]) == env.profile  # not "measured" again elsewhere
    json.dumps(kw)
    inspect.signature(LEDEEnv).bind(**kw)
    assert env_spec_for(env, None) is None


def test_show_and_list(good):
    info = dt.show("lede/tiny/rt-mixed-v0")
    assert info["episodes"] == 6 and info["env_spec"]["kwargs"] == {"k_max": 4, "max_new_tokens": 32}
    assert info["collection"]["behaviour_counts"] and sum(info["collection"]["behaviour_counts"].values()) == 6
    json.dumps(info)
    assert dt.list_datasets()["lede/tiny/rt-mixed-v0"]["episodes"] == 6
    with pytest.raises(FileNotFoundError, match="lede dataset list"):
        dt.show("lede/tiny/nope-v0")


# ---- validation -----------------------------------------------------------------------------
def broken_copy(ds, new_id, mutate=None):
    """A copy of ``ds`` under ``new_id`` with ``mutate(episode_dict)`` applied to episode 0."""
    import minari
    from minari.data_collector import EpisodeBuffer

    m = ds.storage.metadata
    bufs = []
    metas = list(ds.storage.get_episode_metadata(range(ds.total_episodes)))
    for i, (ep, em) in enumerate(zip(ds.storage.get_episodes(range(ds.total_episodes)), metas)):
        ep = {k: ep[k] for k in ("observations", "actions", "rewards", "terminations", "truncations", "infos")}
        ep["infos"] = {k: np.array(v) for k, v in ep["infos"].items()}
        ep["rewards"], ep["terminations"], ep["truncations"] = (list(ep["rewards"]), list(ep["terminations"]),
                                                                 list(ep["truncations"]))
        if i == 0 and mutate is not None:
            mutate(ep)
        bufs.append(EpisodeBuffer(id=i, seed=int(em["seed"]), options={"prompt_index": int(em["options"]["prompt_index"])},
                                  **ep))
    with pytest.warns(UserWarning):
        out = minari.create_dataset_from_buffers(
            new_id, bufs, action_space=ds.action_space, observation_space=ds.observation_space, author="lede",
            code_permalink=m["code_permalink"], description=m["description"], requirements=m["requirements"],
            algorithm_name="copy")
    out.storage.update_metadata({"ref_min_score": m["ref_min_score"], "ref_max_score": m["ref_max_score"],
                                 "env_spec": ds.spec.env_spec.to_json()})
    return out


def _set(key, t, value):
    def f(ep):
        ep[key][t] = value
    return f


def _wrong_action(ep):
    ep["actions"] = ep["actions"].copy()
    ep["actions"][0] = (int(ep["actions"][0]) + 1) % 13
    ep["infos"]["action"][1] = ep["actions"][0]  # consistent infos: only the replay can tell


def _wrong_info(ep):
    ep["infos"]["emitted"][1] += 1
    ep["infos"]["tokens_generated"][1:] += 1  # still adds up: only the replay can tell


def _inconsistent_info(ep):
    ep["infos"]["tokens_generated"][-1] += 1


def _drop_final_obs(ep):
    ep["observations"] = {k: v[:-1] for k, v in ep["observations"].items()}


DEFECTS = {
    "action out of range": (_set("actions", 0, 99), "outside the action space"),
    "wrong action": (_wrong_action, "episode 0 (seed"),
    "wrong reward": (lambda ep: ep["rewards"].__setitem__(0, ep["rewards"][0] + 0.5), "reward"),
    "missing final observation": (_drop_final_obs, "need T+1"),
    "no step infos": (lambda ep: ep.__setitem__("infos", None), "no per-step infos"),
    "step info keys vary": (lambda ep: ep["infos"].pop("cost"), "infos keys"),
    "step infos off": (_wrong_info, "infos['emitted'] at step 0"),
    "step infos do not add up": (_inconsistent_info, "tokens_generated does not grow"),
    "early termination": (_set("terminations", 0, True), "ends at step 0"),
    "no episode end": (lambda ep: (ep["terminations"].__setitem__(-1, False),
                                   ep["truncations"].__setitem__(-1, False)), "neither terminated nor truncated"),
}


def test_validation_of_an_unbroken_copy_finds_nothing(good, env):
    assert dt.validate(broken_copy(good, "lede/tiny/copy-ok-v0"), env) == []


@pytest.mark.parametrize("defect", list(DEFECTS))
def test_validation_catches_each_defect(good, env, defect):
    mutate, expect = DEFECTS[defect]
    assert env.action_space.n == 13 and len(next(good.iterate_episodes()).actions) >= 2
    bad = broken_copy(good, f"lede/tiny/broken{list(DEFECTS).index(defect)}-v0", mutate)
    problems = dt.validate(bad, env)
    assert len(problems) == 1 and problems[0].startswith("episode 0") and expect in problems[0], problems
    with pytest.raises(dt.DatasetInvalid, match="1 problem"):
        dt.check(bad, env)


def test_validation_catches_space_mismatch_and_missing_metadata(good):
    other = make_tiny_env(k_max=3)
    problems = dt.validate(good, other)
    assert any(p.startswith("spaces: dataset action space Discrete(13)") for p in problems), problems
    bad = broken_copy(good, "lede/tiny/nometa-v0")
    meta = Path(bad.storage.data_path) / "metadata.json"
    m = json.loads(meta.read_text())
    del m["ref_max_score"]
    meta.write_text(json.dumps(m))
    assert dt.validate(bad, replay=False) == ["metadata: no 'ref_max_score'"]


# ---- sharding and merge ---------------------------------------------------------------------
def test_shard_parsing():
    assert parse_shard("2/4") == (2, 4) and parse_shard(None) is None and parse_shard(" 1 / 1 ") == (1, 1)
    for s in ("3/2", "x", "0/3", "1/0", "1/2/3", "-1/2"):
        with pytest.raises(ValueError, match="K/N|K <= N"):
            parse_shard(s)
    assert shard_indices(10, (2, 4)) == [1, 5, 9]
    assert sorted(i for k in range(1, 5) for i in shard_indices(10, (k, 4))) == list(range(10))
    with pytest.raises(ValueError, match="empty"):
        CollectConfig(episodes=2, shard="3/3")


def test_merge_of_shards_equals_unsharded_collection(good, env):
    cfg = dict(episodes=7, seed=3)
    full = collect(env, CollectConfig(dataset_id="lede/tiny/full-mixed-v0", **cfg), progress=False,
                   env_spec=tiny_spec())
    parts = [collect(env, CollectConfig(dataset_id="lede/tiny/mg-mixed-v0", shard=f"{k}/2", **cfg), progress=False,
                     env_spec=tiny_spec()) for k in (1, 2)]
    ids = [p.spec.dataset_id for p in parts]
    assert ids == ["lede/tiny/mg-mixed-shard1of2-v0", "lede/tiny/mg-mixed-shard2of2-v0"]
    assert [p.total_episodes for p in parts] == [4, 3]
    merged = dt.merge(ids, "lede/tiny/mg-mixed-v0", env=env)
    assert episodes_of(merged) == episodes_of(full) and len(episodes_of(full)) == 7
    mm, fm = merged.storage.metadata, full.storage.metadata
    assert (merged.total_episodes, merged.total_steps) == (full.total_episodes, full.total_steps)
    for k in ("ref_min_score", "ref_max_score", "algorithm_name", "requirements", "code_permalink"):
        assert mm[k] == pytest.approx(fm[k]) if isinstance(fm[k], float) else mm[k] == fm[k], k
    assert mm["lede_collection"]["behaviour_counts"] == fm["lede_collection"]["behaviour_counts"]
    assert mm["lede_collection"]["merged_from"] == ids and mm["combined_datasets"] == []
    assert "7 episodes" in mm["description"] and "Merged from" in mm["description"]
    assert merged.spec.env_spec == full.spec.env_spec
    assert dt.validate(merged) == []  # options survive the merge: episodes replay in the recovered env
    with pytest.raises(ValueError, match="already exists"):
        dt.merge(ids, "lede/tiny/mg-mixed-v0")
    with pytest.raises(ValueError, match="repeat"):
        dt.merge([ids[0], ids[0]], "lede/tiny/mg2-mixed-v0")
    with pytest.raises(ValueError, match="different collections"):
        dt.merge([ids[0], good.spec.dataset_id], "lede/tiny/mg3-mixed-v0")
    assert not any("partial" in k for k in dt.list_datasets())


def test_wall_clock_datasets_are_validated_and_merged_as_far_as_they_can_be():
    """A dataset of measured round costs (cost="wallclock") is validated by replay of
    everything but the measured times (tokens, accepted counts, observations, episode ends under
    greedy decoding; each reward against its stored round), merged, and the CLI says what was
    skipped and why instead of refusing."""
    from gymnasium.envs.registration import EnvSpec
    from typer.testing import CliRunner

    from agents.cli import app

    spec = EnvSpec(id="LEDE-Llama3-Live-v0", entry_point="tests.agents.test_datasets:make_tiny_live_env",
                   kwargs={"cost": "wallclock", "max_new_tokens": 8}, nondeterministic=True)
    wall = make_tiny_live_env()
    cfg = dict(episodes=4, seed=5, mixture={"random": 0.5, "static": 0.5})
    parts = [collect(wall, CollectConfig(dataset_id="lede/tiny/wall-mixed-v0", shard=f"{k}/2", **cfg), progress=False,
                     env_spec=spec) for k in (1, 2)]
    ids = [p.spec.dataset_id for p in parts]
    assert dt.collection_costs(parts[0]) == "wallclock"
    notes: list[str] = []
    assert dt.validate(ids[0], notes=notes) == []  # replayed in the env recovered from the spec
    assert notes == [dt.WALLCLOCK_NOTE]
    # what can be checked still is: another reward mode gives other rewards for the stored rounds,
    # and other prompts other tokens
    bad = dt.validate(ids[0], make_tiny_live_env(reward_mode="ratio"))
    assert bad and "its stored round's reward is" in bad[0]
    ep0 = next(parts[0].iterate_episodes())
    stored = np.asarray(ep0.infos["cost"])[1:]
    assert (stored > 0).all() and np.allclose(ep0.rewards, np.asarray(ep0.infos["emitted"])[1:] - stored)

    r = CliRunner()
    out = r.invoke(app, ["dataset", "validate", ids[1]])
    assert out.exit_code == 0 and f"{ids[1]}: valid" in out.output, out.output
    assert "skipped:" in out.output and "wall-clock times" in out.output
    out = r.invoke(app, ["dataset", "merge", "lede/tiny/wall-mixed-v0", "--shards", "2"])
    assert out.exit_code == 0 and "4 episodes" in out.output, out.output
    assert "wall-clock times" in " ".join(out.output.split())
    merged = dt.load("lede/tiny/wall-mixed-v0")
    refs = [(p.storage.metadata["ref_min_score"], p.storage.metadata["ref_max_score"]) for p in parts]
    m = merged.storage.metadata
    if refs[0] != refs[1]:  # measured on each shard: the merge holds their mean
        assert m["ref_min_score"] == pytest.approx(np.mean([a for a, _ in refs]))
        assert m["ref_max_score"] == pytest.approx(np.mean([b for _, b in refs]))
        assert "reference scores" in out.output
    assert dt.validate(merged) == []


# ---- publish --------------------------------------------------------------------------------
class FakeStorage:
    """A minari CloudStorage in a local folder (``fake://NAME`` -> ``$FAKE_REMOTE_ROOT/NAME``)."""

    uploads: list = []
    fail_listing = False

    def __init__(self, name, token=None):
        self.root = Path(os.environ["FAKE_REMOTE_ROOT"]) / name

    def _src(self, dataset_id):
        from minari.storage.datasets_root_dir import get_dataset_path

        return Path(get_dataset_path(dataset_id))

    def upload_dataset(self, dataset_id):
        FakeStorage.uploads.append(dataset_id)
        shutil.copytree(self._src(dataset_id), self.root / dataset_id)

    def list_datasets(self, prefix=None):
        if FakeStorage.fail_listing:
            raise ConnectionError("no network")
        if not self.root.exists():
            return []
        ids = [str(p.parent.parent.relative_to(self.root)) for p in self.root.rglob("data/metadata.json")]
        return [i for i in ids if prefix is None or i.startswith(prefix)]

    def get_dataset_metadata(self, dataset_id):
        return json.loads((self.root / dataset_id / "data" / "metadata.json").read_text())

    def list_namespaces(self):
        return [str(p.parent.relative_to(self.root)) for p in self.root.rglob("namespace_metadata.json")] \
            if self.root.exists() else []

    def upload_namespace(self, namespace):
        d = self.root / namespace
        d.mkdir(parents=True, exist_ok=True)
        shutil.copy(self._src(namespace) / "namespace_metadata.json", d / "namespace_metadata.json")

    def download_dataset(self, dataset_id, path):  # pragma: no cover
        raise NotImplementedError

    def download_namespace_metadata(self, namespace, path):  # pragma: no cover
        raise NotImplementedError


@pytest.fixture
def fake_remote(monkeypatch, tmp_path):
    from minari.storage import remotes

    monkeypatch.setitem(remotes._registry, "fake", lambda: FakeStorage)
    monkeypatch.setenv("FAKE_REMOTE_ROOT", str(tmp_path / "remote"))
    monkeypatch.setenv("MINARI_REMOTE", "fake://bucket")
    FakeStorage.uploads, FakeStorage.fail_listing = [], False
    return tmp_path / "remote" / "bucket"


def test_dry_run_publish_with_fake_remote(good, env, fake_remote):
    plan = dt.publish("lede/tiny/rt-mixed-v0", dry_run=True, env=env)
    rel = sorted(f["remote_path"] for f in plan["files"])
    assert rel == ["fake://bucket/lede/tiny/rt-mixed-v0/data/main_data.hdf5",
                   "fake://bucket/lede/tiny/rt-mixed-v0/data/metadata.json"]
    assert plan["bytes"] == sum(Path(f["path"]).stat().st_size for f in plan["files"]) > 0
    assert not plan["uploaded"] and FakeStorage.uploads == [] and not fake_remote.exists()
    # the same, really: the remote then holds a loadable copy, and a second publish is refused
    plan = dt.publish("lede/tiny/rt-mixed-v0", env=env)
    assert plan["uploaded"] and FakeStorage.uploads == ["lede/tiny/rt-mixed-v0"]
    meta = json.loads((fake_remote / "lede/tiny/rt-mixed-v0/data/metadata.json").read_text())
    assert meta["dataset_id"] == "lede/tiny/rt-mixed-v0" and meta["total_episodes"] == 6
    assert (fake_remote / "lede" / "namespace_metadata.json").exists()
    with pytest.raises(dt.PublishError, match="already on fake://bucket"):
        dt.publish("lede/tiny/rt-mixed-v0", env=env)


def test_publish_refuses_cleanly(good, env, fake_remote, monkeypatch):
    import huggingface_hub
    from minari.storage import remotes

    # an invalid dataset is never uploaded
    bad = broken_copy(good, "lede/tiny/badpub-v0", _set("rewards", 0, 123.0))
    with pytest.raises(dt.DatasetInvalid, match="reward"):
        dt.publish(bad.spec.dataset_id, env=env)
    # no network: a clear error, nothing uploaded
    FakeStorage.fail_listing = True
    with pytest.raises(dt.PublishError, match="Cannot reach fake://bucket.*Nothing was uploaded"):
        dt.publish("lede/tiny/rt-mixed-v0", env=env)
    assert FakeStorage.uploads == [] and not fake_remote.exists()
    # no remote
    monkeypatch.delenv("MINARI_REMOTE")
    with pytest.raises(dt.PublishError, match="set MINARI_REMOTE"):
        dt.publish("lede/tiny/rt-mixed-v0", env=env)
    with pytest.raises(dt.PublishError, match="KIND://NAME"):
        dt.publish("lede/tiny/rt-mixed-v0", remote="s3:/x", env=env)
    # Hugging Face without a token: refused before any client is made
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    monkeypatch.setitem(remotes._registry, "hf", lambda: pytest.fail("no client without credentials"))
    with pytest.raises(dt.PublishError, match="huggingface-cli login"):
        dt.publish("lede/tiny/rt-mixed-v0", remote="hf://someone", env=env)
    assert dt.publish("lede/tiny/rt-mixed-v0", remote="hf://someone", env=env, dry_run=True)["credentials"] \
        .startswith("no Hugging Face token")


# ---- interrupted collections ----------------------------------------------------------------
def test_interrupted_collection_leaves_nothing_readable(env, monkeypatch):
    import minari

    import agents.collect as col

    ds_id = "lede/tiny/intr-mixed-v0"
    calls = {"n": 0}
    real = col.run_episode

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(col, "run_episode", flaky)
    with pytest.raises(KeyboardInterrupt):
        collect(env, CollectConfig(dataset_id=ds_id, episodes=5), progress=False)
    monkeypatch.setattr(col, "run_episode", real)

    # interrupted while the dataset is being written: the temporary folder goes too
    def interrupt(ds, *a, **k):
        assert store.is_partial(ds.spec.dataset_id) and Path(ds.storage.data_path).exists()
        raise KeyboardInterrupt

    monkeypatch.setattr(dt, "check", interrupt)
    with pytest.raises(KeyboardInterrupt):
        collect(env, CollectConfig(dataset_id=ds_id, episodes=3), progress=False)
    monkeypatch.undo()
    with pytest.raises(FileNotFoundError):
        minari.load_dataset(ds_id)
    assert ds_id not in dt.list_datasets()
    root = Path(minari.storage.datasets_root_dir.get_dataset_path())
    assert not list(root.rglob("partial-*"))
    # re-running starts cleanly
    assert collect(env, CollectConfig(dataset_id=ds_id, episodes=3), progress=False).total_episodes == 3


def test_stale_partial_folder_is_hidden_and_cleaned(good, env):
    import minari

    root = Path(minari.storage.datasets_root_dir.get_dataset_path())
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()  # a pid that no longer runs: the "killed collection"
    tmp_id = f"lede/tiny/partial-{store.host_tag()}-{p.pid}-stale-mixed-v0"
    shutil.copytree(root / "lede/tiny/rt-mixed-v0", root / tmp_id)
    meta = root / tmp_id / "data" / "metadata.json"
    meta.write_text(json.dumps(json.loads(meta.read_text()) | {"dataset_id": tmp_id}))
    assert tmp_id in minari.list_local_datasets()  # Minari itself would list it...
    assert tmp_id not in dt.list_datasets()  # ...lede does not
    with pytest.raises(FileNotFoundError, match="partial"):
        dt.load(tmp_id)
    live = root / f"lede/tiny/partial-{store.host_tag()}-{os.getppid()}-live-mixed-v0"
    live.mkdir()  # a running collection's folder is kept
    collect(env, CollectConfig(dataset_id="lede/tiny/after-mixed-v0", episodes=1), progress=False)
    assert not (root / tmp_id).exists() and live.exists()
    live.rmdir()


# ---- sharded traces -------------------------------------------------------------------------
def test_trace_shards_build_every_continuation_once(monkeypatch, tmp_path):
    import lede_env.continuations as cont
    from lede_env.prompts import load_prompts
    from lede_env.calibration import HeadSpec
    from lede_env.continuations import get_continuations
    from lede_env.traces import TraceSpec, build_continuation_shard

    make_tiny_env()
    b = _TINY["b"]
    monkeypatch.setenv("LEDE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(cont, "encode_prompts", lambda bundle, ps, m: [
        [3 + x % 100 for x in hashlib.sha256(p.text.encode()).digest()[:6]] for p in ps])
    built = []
    real = cont.greedy_decode
    monkeypatch.setattr(cont, "greedy_decode", lambda bundle, ids, m: built.append(list(ids)) or real(bundle, ids, m))
    spec = TraceSpec(None, "humaneval[0:5]", 8, HeadSpec((1, 2, 3), "lens", None))  # lens heads: no calibration
    assert build_continuation_shard(spec, (1, 2), progress=False, bundle=b) == \
        {"trace_prompts": 3, "calib_prompts": 0, "total": 5}
    assert build_continuation_shard(spec, (2, 2), progress=False, bundle=b)["trace_prompts"] == 2
    assert len(built) == 5 and len({tuple(x) for x in built}) == len(built)
    # the unsharded build reuses every shard's continuation and decodes nothing
    monkeypatch.setattr(cont, "greedy_decode", lambda *a: pytest.fail("continuation rebuilt"))
    conts = get_continuations(b, load_prompts("humaneval[0:5]"), 8, progress=False)
    assert len(conts) == 5 and all(c.generated for c in conts)


# ---- CLI ------------------------------------------------------------------------------------
def test_cli_dataset_commands_and_bad_input(good, fake_remote, monkeypatch):
    from typer.testing import CliRunner

    from agents.cli import app

    r = CliRunner()
    out = r.invoke(app, ["dataset", "list"])
    assert out.exit_code == 0 and "lede/tiny/rt-mixed-v0  6 episodes" in out.output
    out = r.invoke(app, ["dataset", "show", "lede/tiny/rt-mixed-v0"])
    assert out.exit_code == 0 and json.loads(out.output)["episodes"] == 6
    out = r.invoke(app, ["dataset", "validate", "lede/tiny/rt-mixed-v0"])
    assert out.exit_code == 0 and "valid" in out.output
    out = r.invoke(app, ["dataset", "publish", "lede/tiny/rt-mixed-v0", "--dry-run"])
    assert out.exit_code == 0 and "would upload 2 files" in out.output and not fake_remote.exists()
    monkeypatch.setattr("lede_env.env.LEDEEnv", lambda **kw: pytest.fail("bad input must fail before the model loads"))
    for args, expect in ((["dataset", "show", "lede/tiny/nope-v0"], "lede dataset list"),
                         (["collect", "--dataset-id", "mine-v0"], "lede/<model>/<prompt-set>"),
                         (["collect", "--episodes", "2", "--shard", "3/3"], "empty"),
                         (["dataset", "validate", "nope"], "No local dataset"),
                         (["dataset", "merge", "bad id"], "nothing to merge"),
                         (["dataset", "merge", "lede/tiny/x-v0", "--shards", "2"], "No local dataset"),
                         (["collect", "--shard", "3/2"], "K <= N"),
                         (["collect", "--shard", "x"], "K/N"),
                         (["traces", "build", "--shard", "0/4"], "K <= N")):
        out = r.invoke(app, args)
        assert out.exit_code == 2 and expect in out.output, (args, out.output)
    monkeypatch.delenv("MINARI_REMOTE")
    out = r.invoke(app, ["dataset", "publish", "lede/tiny/rt-mixed-v0"])
    assert out.exit_code == 2 and "MINARI_REMOTE" in out.output


def test_flat_layout_of_a_dataset_is_the_env_layout_with_context_and_without_head_stats(tiny):
    """A dataset of a compact env without head statistics and with context actions trains agents
    on exactly the env's flat layout (the d3rlpy and sb3 agents read it; exports check it)."""
    from agents.collect import CollectConfig, collect
    from agents.train import flat_layout
    from lede_env.env import LEDEEnv

    b, _, ts, prof = tiny
    env = LEDEEnv.with_objects(trace_set=ts, profile=prof, eos_ids=b.eos_ids, k_max=4, max_new_tokens=16, obs_kind="compact",
                  obs_stat_exits=0, context_lengths=(2, 4))
    ds = collect(env, CollectConfig(dataset_id="lede/tiny/ctx-layout-v0", episodes=2, seed=0), progress=False)
    assert flat_layout(ds) == [(k, list(s)) for k, s in env.observer.layout()]
    assert [k for k, _ in flat_layout(ds)] == ["experience", "history", "progress", "context"]


def test_requirements_pin_public_versions(monkeypatch):
    """A torch build with a local label (``2.13.0+cpu``) is recorded as ``torch==2.13.0``, which
    every build of the release meets (minari's ``recover_environment`` warns otherwise on the CUDA
    build of the same torch, pytorch/rl PR #3920)."""
    import importlib.metadata

    from packaging.requirements import Requirement
    from packaging.version import Version

    from agents import collect

    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda p: "2.13.0+cpu" if p == "torch" else real(p))
    reqs = {Requirement(r).name: Requirement(r) for r in collect._requirements()}
    assert str(reqs["torch"].specifier) == "==2.13.0"
    for build in ("2.13.0+cpu", "2.13.0+cu126", "2.13.0"):
        assert reqs["torch"].specifier.contains(Version(build))
    assert not reqs["torch"].specifier.contains(Version("2.13.1"))
    assert all("+" not in r for r in collect._requirements())


def test_a_dataset_being_written_is_one_error_line_naming_the_writer(good, tmp_path):
    """``lede dataset validate`` (and every command that reads a dataset) while another process
    holds its HDF5 file open for writing: one error line naming the dataset, the writer's pid and
    the fix, exit 2, no traceback (it was a ``BlockingIOError`` traceback: h5py #1722)."""
    import os
    import subprocess
    import sys

    from agents.store import minari_root

    busy = tmp_path / "lede" / "tiny" / "busy-v0"
    shutil.copytree(minari_root() / "lede" / "tiny" / "rt-mixed-v0", busy)  # (a whole dataset)
    writer = subprocess.Popen([sys.executable, "-c", "import h5py, sys, time\nf = h5py.File(sys.argv[1], 'a')\n"
                               "print('open', flush=True)\ntime.sleep(120)", str(busy / "data" / "main_data.hdf5")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "open"
        env = {**os.environ, "MINARI_DATASETS_PATH": str(tmp_path)}
        for args in (["dataset", "validate", "lede/tiny/busy-v0", "--no-replay"], ["dataset", "show", "lede/tiny/busy-v0"],
                     ["train", "--dataset-id", "lede/tiny/busy-v0", "--algo", "discrete_bc", "--steps", "1", "--out",
                      str(tmp_path / "run"), "--wandb", "disabled"]):
            r = subprocess.run([sys.executable, "-c", "from agents.cli import main; main()", *args], env=env,
                               capture_output=True, text=True, timeout=300)
            out = " ".join((r.stdout + r.stderr).split())
            assert r.returncode == 2, out
            assert "Traceback" not in out and out.startswith("error:"), out
            assert f"'lede/tiny/busy-v0' is being written by pid {writer.pid}" in out, out
            assert "wait for it to finish" in out
    finally:
        writer.kill()
        writer.wait()
