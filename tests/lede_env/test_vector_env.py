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
