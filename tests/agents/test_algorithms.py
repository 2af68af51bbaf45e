"""Every algorithm of ``lede train --algo`` trains on a tiny dataset, evaluates on held-out
traces, exports, and its export acts like the trained agent."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from agents.collect import CollectConfig, collect
from agents.export import export_policy
from lede_env.policies import ExportedPolicy
from agents.sb3 import observation_stats, split_flat
from agents.train import ALGOS, TrainConfig, evaluate_agent, load_algo, to_mdp_dataset, train


@pytest.fixture(scope="module")
def data(tiny):
    from lede_env.env import LEDEEnv

    b, heads, ts, prof = tiny
    env = LEDEEnv.with_objects(trace_set=ts, profile=prof, eos_ids=b.eos_ids, k_max=4, max_new_tokens=32)
    ds = collect(env, CollectConfig(dataset_id="lede/tiny/algos-mixed-v0", episodes=10, seed=1), progress=False)
    return env, ds


def _flat(env, ds, n=48):
    return np.stack([env.observer.flatten({k: v[i] for k, v in ep.observations.items()})
                     for ep in ds.iterate_episodes() for i in range(len(ep.actions))][:n]).astype(np.float32)


@pytest.mark.parametrize("algo", ALGOS)
def test_every_algorithm_trains_evaluates_and_exports(algo, data, tmp_path):
    env, ds = data
    steps = 256 if algo in ("ppo", "online_dqn") else 40
    cfg = TrainConfig(dataset_id="lede/tiny/algos-mixed-v0", algo=algo, steps=steps, steps_per_epoch=steps,
                      batch_size=16, hidden=(32,), target_update_interval=20, ppo_n_steps=64,
                      out_dir=str(tmp_path / algo), wandb="disabled", seed=3)
    agent, layout = train(cfg, progress=False, dataset=ds, env=env, eval_env=env)
    import json

    summary = json.loads((tmp_path / algo / "eval.json").read_text())
    assert summary["algo"] == algo and summary["train_seconds"] > 0
    direct = evaluate_agent(agent, layout, env)
    assert summary["heldout_throughput"] == pytest.approx(direct["throughput"])
    assert 0 < direct["oracle_share"] <= 1 + 1e-9  # no policy beats the oracle on the same traces
    obs = _flat(env, ds)
    acts = np.asarray(agent.predict(obs))
    assert ((0 <= acts) & (acts < env.action_space.n)).all()
    # the saved run folder reloads to the same greedy actions, and the export matches them
    again = load_algo(tmp_path / algo)
    np.testing.assert_array_equal(np.asarray(again.predict(obs)), acts)
    with warnings.catch_warnings(record=True) as caught:  # lede export prints no tracer warning
        warnings.simplefilter("always")
        pol = ExportedPolicy(export_policy(again, env, tmp_path / f"{algo}-policy", algo, 0.5))
    assert not [str(w.message) for w in caught if issubclass(w.category, torch.jit.TracerWarning)]
    pol.check_compatible(env.observer, env.actions)
    # the trace (batch 1) is right for a batch of 48: the silenced shape check was harmless
    np.testing.assert_array_equal(pol.module(torch.from_numpy(obs)).numpy(), acts)


def test_sb3_offline_dqn_buffer_holds_the_dataset(data):
    from stable_baselines3.common.buffers import DictReplayBuffer

    from agents.sb3 import dict_space, fill_replay_buffer

    env, ds = data
    mdp, layout = to_mdp_dataset(ds)
    mean, std = observation_stats(np.concatenate([e.observations for e in mdp.episodes]))
    buf = DictReplayBuffer(ds.total_steps, dict_space(layout), ds.action_space, device="cpu")
    assert fill_replay_buffer(buf, ds, layout, mean, std) == ds.total_steps
    ep0 = next(iter(ds.iterate_episodes()))
    T = len(ep0.actions)
    first = split_flat(((_flat(env, ds, 1) - mean) / std).astype(np.float32), layout)
    for k, v in first.items():
        np.testing.assert_allclose(buf.observations[k][0], v, rtol=1e-5, atol=1e-6)
    assert buf.actions[:T, 0, 0].tolist() == [int(a) for a in ep0.actions]
    np.testing.assert_allclose(buf.rewards[:T, 0], ep0.rewards, rtol=1e-6)
    assert buf.dones[:T, 0].tolist() == [0.0] * (T - 1) + [1.0]
    # next observation of step t is the observation of step t + 1
    for k in first:
        np.testing.assert_allclose(buf.next_observations[k][0], buf.observations[k][1])


def test_bad_algorithm_and_settings_are_refused():
    with pytest.raises(ValueError, match="Unknown algorithm"):
        TrainConfig(algo="sac")
    with pytest.raises(ValueError, match="learning_rate"):
        TrainConfig(learning_rate=0.0)


def test_training_logs_to_wandb_offline(data, tmp_path, monkeypatch):
    """Training runs log to W&B offline by default (no network needed; `wandb sync` uploads)."""
    env, ds = data
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = TrainConfig(dataset_id="lede/tiny/algos-mixed-v0", algo="sb3_offline_dqn", steps=20, steps_per_epoch=10,
                      batch_size=16, hidden=(16,), out_dir=str(tmp_path), seed=0)
    assert cfg.wandb == "offline"
    train(cfg, progress=False, dataset=ds, eval_env=env)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb"))
    progress = (tmp_path / "sb3_logs" / "progress.csv").read_text().splitlines()
    assert "train/loss" in progress[0] and len(progress) == 3  # header + one line per epoch


def test_heldout_prompts_must_not_be_training_prompts():
    from types import SimpleNamespace

    from agents.train import heldout_env

    ds = SimpleNamespace(spec=SimpleNamespace(dataset_id="lede/x/y-v0",
                                              env_spec=SimpleNamespace(kwargs={"prompts": "humaneval[0:4]"})))
    with pytest.raises(ValueError, match=r"share 2 prompt\(s\) with the dataset's training prompts"):
        heldout_env(ds, "humaneval[2:6]")
    ds.spec.env_spec = None
    with pytest.raises(ValueError, match="stores no env spec"):
        heldout_env(ds, "humaneval[8:9]")


@pytest.mark.parametrize("algo", ["trace_q", "discrete_cql", "ppo"])
def test_algorithms_train_on_the_compact_observation(algo, tiny, tmp_path):
    """The demo's setting: compact observation, calibrated in-round stop rule, relative reward.
    Training, evaluation and export work on its flat layout, and the export acts like the agent."""
    from lede_env.env import LEDEEnv
    from lede_env.exits import ExitHeads, calibrate_acceptance

    from ..conftest import tiny_continuations

    b, _, ts, prof = tiny
    heads = ExitHeads(b.stack, (1, 2, 3), "lens")
    calibrate_acceptance(heads, [(torch.tensor(c.prompt_ids + c.generated), len(c.prompt_ids))
                                 for c in tiny_continuations(b, 6, seed=2)])
    env = LEDEEnv.with_objects(trace_set=ts, profile=prof, eos_ids=b.eos_ids, k_max=4, max_new_tokens=32, heads=heads,
                  obs_kind="compact", stop_rule="calibrated")
    ds = collect(env, CollectConfig(dataset_id=f"lede/tiny/compact-{algo}-v0", episodes=6, seed=1), progress=False)
    steps = 256 if algo == "ppo" else 40
    cfg = TrainConfig(dataset_id=f"lede/tiny/compact-{algo}-v0", algo=algo, steps=steps, steps_per_epoch=steps,
                      batch_size=16, hidden=(32,), ppo_n_steps=64, out_dir=str(tmp_path / algo), wandb="disabled")
    agent, layout = train(cfg, progress=False, dataset=ds, env=env, eval_env=env)
    assert [k for k, _ in layout] == ["exit_stats", "experience", "history", "progress"]
    pol = ExportedPolicy(export_policy(agent, env, tmp_path / "policy", algo, 0.5))
    pol.check_compatible(env.observer, env.actions)
    assert pol.config["stop_rule"]["kind"] == "calibrated" and pol.config["observation"]["kind"] == "compact"
    obs = _flat(env, ds)
    np.testing.assert_array_equal(pol.module(torch.from_numpy(obs)).numpy(), np.asarray(agent.predict(obs)))
    # the runtime act() uses: a numpy twin of trace_q's MLP, TorchScript for the others; same actions
    assert pol.runtime == ("numpy" if algo == "trace_q" else "torchscript")
    layout = env.observer.layout()
    sizes = [int(np.prod(shape)) for _, shape in layout]
    for x in obs:
        parts = np.split(x, np.cumsum(sizes)[:-1])
        o = {k: p.reshape(shape) for (k, shape), p in zip(layout, parts)}
        assert pol.act(o) == int(agent.predict(x[None])[0])
    if algo != "trace_q":
        with pytest.raises(ValueError, match="runtime='numpy'"):
            ExportedPolicy(tmp_path / "policy", runtime="numpy")


@pytest.mark.parametrize("exact", [False, True])
def test_trace_q_targets_cover_the_same_stretch_under_the_static_policy(tiny, exact):
    """With a horizon, an action's target is its round followed by the reference action's rounds
    until ``horizon`` tokens past the state, tokens - lambda * cost, as stepping the env gives;
    with ``exact`` the round that crosses the horizon counts only its tokens up to it and that
    share of its cost, so every stretch holds exactly ``horizon`` tokens (or ends with the
    episode)."""
    from lede_env.env import LEDEEnv
    from agents.trace_q import _targets

    b, _, ts, prof = tiny
    env = LEDEEnv.with_objects(trace_set=ts, profile=prof, eos_ids=b.eos_ids, k_max=4, max_new_tokens=32, context_lengths=(2, 4))
    u = env.unwrapped
    lam, follow, H = 1.3, u.actions.encode(2, 1), 8
    u.reset(seed=0, options={"prompt_index": 1})
    u.step(0)  # a state after one round
    actions = list(range(u.actions.n))
    got = _targets(u, lam, actions, H, follow, exact=exact)
    assert np.allclose(_targets(u, lam, actions), [_targets(u, lam, [a])[0] for a in actions])
    g0 = u._g
    for j, a in enumerate(actions):
        u.reset(seed=0, options={"prompt_index": 1})
        u.step(0)
        tok = cost = 0.0
        act, first, done = a, True, False
        while not done and (first or u._g < g0 + H):
            g = u._g
            _, _, te, tr, info = u.step(act)
            n, c = info["round"]["emitted"], info["round"]["cost"]
            if exact and g + n > g0 + H:  # the crossing round, pro rata
                n, c = g0 + H - g, c * (g0 + H - g) / n
            tok, cost, done = tok + n, cost + c, te or tr
            act, first = follow, False
        if exact and not done:
            assert tok == H, a
        assert got[j] == pytest.approx(tok - lam * cost, rel=1e-5), a


def test_trace_q_regresses_advantages_over_the_static_action(tiny):
    """``advantage=True`` (the default) trains on targets minus the static action's: the agent
    records it, and a network fitted to advantages keeps the static action's own near zero."""
    from lede_env.env import LEDEEnv
    from agents.trace_q import train_trace_q

    b, _, ts, prof = tiny
    env = LEDEEnv.with_objects(trace_set=ts, profile=prof, eos_ids=b.eos_ids, k_max=4, max_new_tokens=16, context_lengths=(2, 4))
    u = env.unwrapped
    agent = train_trace_q(env, steps=300, iterations=1)
    assert agent.info["advantage"] and agent.info["exact_horizon"]
    static = agent.info["static"]
    obs, _ = u.reset(seed=0, options={"prompt_index": 0})
    x = torch.from_numpy(np.stack([u.flatten_observation(obs)]))
    with torch.no_grad():
        q = agent.policy.net((x - agent.policy.mean) / agent.policy.std)[0]
    assert abs(float(q[static])) < 0.25  # its target is 0 at every state
    assert not train_trace_q(env, steps=10, iterations=1, advantage=False).info["advantage"]


def test_trace_q_without_exits_chooses_plain_steps_and_context_drafts_only(tiny):
    """``exits=False``: every action the agent may take, and every one it takes, is action 0 or a
    context action."""
    from lede_env.env import LEDEEnv
    from agents.trace_q import train_trace_q

    b, _, ts, prof = tiny
    env = LEDEEnv.with_objects(trace_set=ts, profile=prof, eos_ids=b.eos_ids, k_max=4, max_new_tokens=16, context_lengths=(2, 4))
    u = env.unwrapped
    agent = train_trace_q(env, steps=40, iterations=2, exits=False)
    assert agent.allowed and max(agent.allowed) < u.actions.first_exit_action
    obs, _ = u.reset(seed=0, options={"prompt_index": 0})
    taken = agent.predict(np.stack([u.flatten_observation(obs)] * 3))
    assert all(int(a) < u.actions.first_exit_action for a in taken)


def test_trace_q_visits_the_states_of_more_envs_and_refuses_other_layouts(tiny):
    """``more_envs``: every playable trace of each extra env is visited too, after the env's own,
    under the primary env's lambda; an env with another action map cannot join."""
    from lede_env.env import LEDEEnv
    from lede_env.traces import TraceSet
    from agents.trace_q import train_trace_q

    b, _, ts, prof = tiny
    kw = dict(profile=prof, eos_ids=b.eos_ids, k_max=4, max_new_tokens=16, context_lengths=(2, 4))
    env = LEDEEnv.with_objects(trace_set=TraceSet(ts.traces[:3], ts.manifest), **kw)
    more = LEDEEnv.with_objects(trace_set=TraceSet(ts.traces[3:], ts.manifest), **kw, reward_lambda=env.unwrapped.reward_lambda)
    visited = []
    for e in (env, more):
        u = e.unwrapped
        u.reset = (lambda reset, u: lambda **k: visited.append((u, k["options"]["prompt_index"])) or reset(**k))(
            u.reset, u)
    both = train_trace_q(env, steps=5, iterations=1, more_envs=[more])
    assert visited == [(e.unwrapped, i) for e in (env, more) for i in e.unwrapped.playable]
    alone = train_trace_q(env, steps=5, iterations=1).info["iterations"][0]["states"]
    assert both.info["iterations"][0]["states"] > alone
    assert both.info["lambda"] == pytest.approx(env.unwrapped.reward_lambda)
    with pytest.raises(ValueError, match="action map"):
        train_trace_q(env, steps=5, iterations=1,
                      more_envs=[LEDEEnv.with_objects(trace_set=ts, **dict(kw, context_lengths=(2,)))])
