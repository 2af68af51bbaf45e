"""Vector envs step as the single envs do: ``gym.make_vec`` with ``sync`` and ``async``
vectorisation, the latter with the default start method (fork on Linux: it hung, the child's
first torch op waiting on the parent's thread pool; Gymnasium #222, PR #810) and with spawn, on
an env built from a saved tiny model, after the parent itself ran torch on several threads."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch


@pytest.fixture(scope="module")
def env_kwargs(tmp_path_factory):
    from lede_env.model import save_tiny_model

    mp = pytest.MonkeyPatch()
    mp.setenv("LEDE_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))  # (children inherit it: traces built once)
    model = save_tiny_model(tmp_path_factory.mktemp("tiny") / "model", num_layers=4)
    kw = dict(model=str(model), prompts="humaneval[0:3]", max_new_tokens=12, head_kind="lens", draft_vocab=None,
              calib_prompts="humaneval[100:103]",  # (a few: the heads fit in seconds)
              cost_profile="analytic", progress=False)
    yield kw
    mp.undo()


def _rollout_single(kw, seeds, actions):
    out = []
    for i, seed in enumerate(seeds):
        env = gym.make("LEDE-Llama3-v0", **kw)
        obs, _ = env.reset(seed=seed)
        steps = [(obs, 0.0, False)]
        for a in actions[i]:
            obs, r, term, trunc, _ = env.step(int(a))
            steps.append((obs, r, term or trunc))
            if term or trunc:
                break
        out.append(steps)
        env.close()
    return out


@pytest.mark.parametrize("mode,context", [("sync", None), ("async", None), ("async", "spawn")])
def test_vector_envs_step_as_single_envs(env_kwargs, mode, context):
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.randn(256, 256) @ torch.randn(256, 256)  # (the parent's thread pool is up before the fork)
        n_actions = gym.make("LEDE-Llama3-v0", **env_kwargs).action_space.n
        seeds = [3, 4]
        rng = np.random.default_rng(0)
        actions = rng.integers(0, n_actions, size=(2, 12))
        want = _rollout_single(env_kwargs, seeds, actions)
        vec_kwargs = {} if context is None else {"context": context}
        venv = gym.make_vec("LEDE-Llama3-v0", num_envs=2, vectorization_mode=mode, vector_kwargs=vec_kwargs,
                            **env_kwargs)
        try:
            if mode == "async":  # (a hang is a failure after 240 s, not a run that never ends)
                venv.reset_async(seed=seeds)
                obs, _ = venv.reset_wait(timeout=240)
            else:
                obs, _ = venv.reset(seed=seeds)
            for i in range(2):
                for k, v in want[i][0][0].items():
                    np.testing.assert_allclose(obs[k][i], v, rtol=1e-6, atol=1e-6)
            done = [False, False]
            for t in range(actions.shape[1]):
                if mode == "async":
                    venv.step_async(actions[:, t])
                    obs, r, term, trunc, _ = venv.step_wait(timeout=240)
                else:
                    obs, r, term, trunc, _ = venv.step(actions[:, t])
                for i in range(2):
                    if done[i] or t + 1 >= len(want[i]):
                        continue  # (autoreset: what follows an episode's end is a new episode)
                    w_obs, w_r, w_end = want[i][t + 1]
                    assert r[i] == pytest.approx(w_r, rel=1e-6, abs=1e-9)
                    assert bool(term[i] or trunc[i]) == w_end
                    for k, v in w_obs.items():
                        np.testing.assert_allclose(obs[k][i], v, rtol=1e-6, atol=1e-6)
                    done[i] = w_end
        finally:
            venv.close(**({"terminate": True} if mode == "async" else {}))  # (hung workers are killed)
    finally:
        torch.set_num_threads(threads)


# ---- lede's native vector env (lede_env.vector_env.TraceVectorEnv) -------------------------------

NATIVE_SETTINGS = {
    "full observation, exit actions": {},
    "compact observation, context actions": dict(obs_kind="compact", context_lengths=(1, 2, 4), obs_context_span=True,
                                                 obs_context_agreement=True),
}


def _assert_steps_equal(native, sync, steps: int, seed, rng) -> None:
    """``native`` and ``sync`` (Gymnasium's SyncVectorEnv over single envs) give the same
    observations, rewards, episode ends and prompt indexes, to the bit, for the same actions."""
    o1, i1 = native.reset(seed=seed)
    o2, i2 = sync.reset(seed=seed)
    np.testing.assert_array_equal(i1["prompt_index"], i2["prompt_index"])
    ends = 0
    for _ in range(steps):
        for k in o2:
            np.testing.assert_array_equal(o1[k], o2[k], err_msg=k)
        a = rng.integers(0, native.single_action_space.n, native.num_envs)
        o1, r1, te1, tr1, i1 = native.step(a)
        o2, r2, te2, tr2, i2 = sync.step(a)
        np.testing.assert_array_equal(r1, r2)
        np.testing.assert_array_equal(te1, te2)
        np.testing.assert_array_equal(tr1, tr2)
        played = i2["_tokens_generated"]  # (False in a sub-env reset on this step)
        np.testing.assert_array_equal(i1["tokens_generated"][played], i2["tokens_generated"][played])
        reset = i2.get("_prompt_index", np.zeros(native.num_envs, bool))
        np.testing.assert_array_equal(i1["_prompt_index"], reset)
        if reset.any():
            np.testing.assert_array_equal(i1["prompt_index"][reset], i2["prompt_index"][reset])
        ends += int((te1 | tr1).sum())
    assert ends >= native.num_envs  # (every sub-env ended, and was reset, at least once)


@pytest.mark.parametrize("name", list(NATIVE_SETTINGS))
def test_native_vector_env_steps_as_n_single_envs(env_kwargs, name):
    from lede_env.vector_env import TraceVectorEnv, make_vector_env

    kw = env_kwargs | NATIVE_SETTINGS[name]
    native = make_vector_env(num_envs=3, **kw)
    assert isinstance(native, TraceVectorEnv)
    assert native.metadata["autoreset_mode"] in ("NextStep",) or native.metadata["autoreset_mode"].value == "NextStep"
    sync = gym.make_vec("LEDE-Llama3-v0", num_envs=3, vectorization_mode="sync", **kw)
    assert native.single_observation_space == sync.single_observation_space
    assert native.observation_space == sync.observation_space and native.action_space == sync.action_space
    rng = np.random.default_rng(1)
    _assert_steps_equal(native, sync, 40, 7, rng)
    _assert_steps_equal(native, sync, 20, [11, 12, 13], rng)  # (a seed per sub-env)
    native.close()
    sync.close()


def test_native_vector_env_round_tables_are_replay_rounds_and_cached(env_kwargs):
    from lede_env.replay import budget, replay_round
    from lede_env.vector_env import round_tables

    env = gym.make("LEDE-Llama3-v0", **env_kwargs).unwrapped
    tables = round_tables(env)
    again = round_tables(env)  # (read back from the cache)
    fresh = round_tables(env, cache=False)
    for t, idx in enumerate(env.playable):
        trace = env.trace_set.traces[idx]
        limit = budget(trace, env.max_new_tokens)
        assert tables.limit[t] == limit
        for g in range(1, limit):
            for a in range(env.action_space.n):
                oc, E, cost = replay_round(trace, g, a, env.rules, limit)
                for tb in (tables, again, fresh):
                    assert (tb.emitted[t, g, a], tb.accepted[t, g, a], tb.draft_len[t, g, a], tb.n_verify[t, g, a],
                            tb.exit_layer[t, g, a], tb.done[t, g, a], tb.eos[t, g, a]) == \
                        (len(oc.emitted), oc.accepted, oc.draft_len, oc.n_verify, E, oc.done, oc.eos)
                    assert tb.cost[t, g, a] == cost


def test_native_vector_env_rejects_bad_input(env_kwargs):
    from lede_env.vector_env import TraceVectorEnv

    with pytest.raises(ValueError, match="num_envs"):
        TraceVectorEnv(num_envs=0, **env_kwargs)
    with pytest.raises(ValueError, match="live backend"):
        TraceVectorEnv(num_envs=2, backend="live", **env_kwargs)
    venv = TraceVectorEnv(num_envs=2, **env_kwargs)
    with pytest.raises(RuntimeError, match="reset"):
        venv.step(np.zeros(2, np.int64))
    venv.reset(seed=0)
    n = venv.single_action_space.n
    for bad in (np.zeros(3, np.int64), np.array([0, n]), np.array([0.0, 1.0]), np.array([-1, 0])):
        with pytest.raises(ValueError, match="integer actions"):
            venv.step(bad)
    with pytest.raises(ValueError, match="seeds for 2 envs"):
        venv.reset(seed=[1, 2, 3])
    with pytest.raises(ValueError, match="not a playable trace"):
        venv.reset(options={"prompt_index": 99})


def test_the_benchmark_task_makes_the_native_vector_env_by_default():
    spec = gym.spec("LEDE-Llama3-v1")
    assert spec.vector_entry_point == "lede_env.vector_env:make_vector_env"
    assert gym.spec("LEDE-Llama3-v0").vector_entry_point is None  # (v0 is kept as it was)
