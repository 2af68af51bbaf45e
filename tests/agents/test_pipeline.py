"""collect -> Minari -> d3rlpy -> export -> the real decoder, on the tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from agents.collect import CollectConfig, collect
from agents.store import reference_scores
from agents.export import export_policy
from agents.policies import best_static_action
from lede_env.policies import ExportedPolicy, HeuristicPolicy
from agents.train import TrainConfig, to_mdp_dataset, train
from lede_env.decoding import RoundRecord, SelfSpeculativeDecoder
from lede_env.mdp import ObservationBuilder, ObservationConfig


@pytest.fixture(scope="module")
def dataset(tiny):
    from lede_env.env import LEDEEnv

    b, heads, ts, prof = tiny
    env = LEDEEnv.with_objects(trace_set=ts, profile=prof, eos_ids=b.eos_ids, k_max=4, max_new_tokens=32)
    ds = collect(env, CollectConfig(dataset_id="lede/tiny/test-mixed-v0", episodes=12, seed=0), progress=False)
    return env, ds


def test_dataset_round_trip(dataset):
    import minari

    env, ds = dataset
    again = minari.load_dataset("lede/tiny/test-mixed-v0")
    assert again.total_episodes == 12
    for ep in again.iterate_episodes():
        T = len(ep.actions)
        assert ep.observations["hidden"].shape[0] == T + 1  # Minari: T+1 observations, T actions
        assert ((0 <= ep.actions) & (ep.actions < env.action_space.n)).all()
        assert ep.terminations[-1] or ep.truncations[-1]
    # replay each episode from its stored seed, options and actions: same rewards
    for ep, meta in zip(again.iterate_episodes(), again.storage.get_episode_metadata(again.episode_indices)):
        env.reset(seed=meta["seed"], options={"prompt_index": int(meta["options"]["prompt_index"])})
        rewards = [env.step(int(a))[1] for a in ep.actions]
        np.testing.assert_allclose(rewards, ep.rewards, rtol=1e-6)
    lo, hi = reference_scores(env)
    assert again.storage.metadata["ref_min_score"] == pytest.approx(lo)
    assert hi >= lo


def test_duplicate_dataset_id_is_refused(dataset):
    env, _ = dataset
    with pytest.raises(ValueError, match="already exists"):
        collect(env, CollectConfig(dataset_id="lede/tiny/test-mixed-v0", episodes=1), progress=False)


def test_mdp_dataset_alignment(dataset):
    env, ds = dataset
    mdp, layout = to_mdp_dataset(ds)
    assert layout == [(k, list(s)) for k, s in env.observer.layout()]
    assert mdp.transition_count == ds.total_steps
    ep0 = next(iter(ds.iterate_episodes()))
    flat0 = env.observer.flatten({k: v[0] for k, v in ep0.observations.items()})
    np.testing.assert_allclose(mdp.episodes[0].observations[0], flat0)


def test_train_export_and_decode(dataset, tiny, tmp_path):
    b, heads, ts, prof = tiny
    env, ds = dataset
    algo, layout = train(TrainConfig(dataset_id="lede/tiny/test-mixed-v0", algo="dqn", steps=60, steps_per_epoch=30,
                                     batch_size=32, out_dir=str(tmp_path / "run"), wandb="disabled"),
                         progress=False, dataset=ds)
    out = export_policy(algo, env, tmp_path / "policy", "dqn", 0.9, onnx=True)
    pol = ExportedPolicy(out)
    # TorchScript and ONNX (onnxruntime) exports choose the same actions on recorded observations
    obs = torch.from_numpy(np.stack([env.observer.flatten({k: v[i] for k, v in ep.observations.items()})
                                     for ep in ds.iterate_episodes() for i in range(len(ep.actions))][:64]))
    onnx_pol = ExportedPolicy(out, runtime="onnxruntime")
    assert onnx_pol.module(obs).tolist() == pol.module(obs).tolist()
    assert sorted(p.name for p in out.iterdir()) == ["policy.json", "policy.onnx", "policy.pt"]
    pol.check_compatible(env.observer, env.actions)
    dec = SelfSpeculativeDecoder(b.stack, heads, 4, b.eos_ids, True, prof, ObservationConfig(**pol.config["observation"]))
    t = ts.traces[0]
    res = dec.generate(torch.tensor(t.prompt), pol, 32)
    assert res.tokens == t.generated[:32].tolist()
    wrong = ObservationBuilder(ObservationConfig(hidden_dim=8), 64, 3, 4, 4, 128)
    with pytest.raises(ValueError, match="layout"):
        pol.check_compatible(wrong, env.actions)


def test_heuristic_schedule():
    from lede_env.mdp import ActionMap

    A = ActionMap((1, 2), 8)
    h = HeuristicPolicy(A, 2, k_start=3)
    assert A.decode(h.act(None)) == (2, 3)
    h.update(RoundRecord(action=0, exit_layer=2, draft_len=3, accepted=3, emitted=4))
    assert A.decode(h.act(None)) == (2, 5)
    h.update(RoundRecord(action=0, exit_layer=2, draft_len=5, accepted=1, emitted=2))
    assert A.decode(h.act(None)) == (2, 4)


def test_best_static_is_best(tiny_env):
    from lede_env.replay import rollout, throughput

    a, tp = best_static_action(tiny_env)
    u = tiny_env
    for other in range(u.actions.n):
        tp2 = throughput([rollout(u.trace_set.traces[i], u.rules, u.max_new_tokens, lambda g: other)
                          for i in u.playable])
        assert tp >= tp2 - 1e-12


def test_del_policy_follows_acceptance(tiny_env):
    from lede_env.policies import DELPolicy

    u = tiny_env
    p = DELPolicy(u.actions, u.profile, prior=0.0, decay=0.5)
    obs, _ = u.reset(seed=0)
    obs = {k: v.copy() for k, v in obs.items()}
    obs["exit_stats"][:, 2] = 0.0
    assert p.act(obs) == 0  # nothing is ever accepted: plain AR steps
    obs["exit_stats"][:, 2] = 1.0
    for _ in range(30):
        a = p.act(obs)
    E, K = u.actions.decode(a)
    assert E > 0 and K == u.actions.k_max  # everything accepted: the longest draft
