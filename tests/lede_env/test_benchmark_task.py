"""The registered benchmark task ``LEDE-Llama3-v1``: the task lede studies, the same MDP on every
machine (shipped traces, reference costs, shipped best-static search), a valid Gymnasium env."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import assert_damaged_shipped_file_ignored


def _returns(env, seeds=range(4), steps=40):
    """Per-episode returns of seeded random actions on the first prompts (the same actions for
    every env that has the same action space)."""
    out = []
    rng = np.random.default_rng(0)
    for i, seed in enumerate(seeds):
        env.reset(seed=seed, options={"prompt_index": env.unwrapped.playable[i]})
        total, done, n = 0.0, False, 0
        while not done and n < steps:
            _, r, te, tr, _ = env.step(int(rng.integers(env.action_space.n)))
            total, done, n = total + r, te or tr, n + 1
        out.append(total)
    return out


@pytest.mark.embedded
def test_v1_is_the_studied_task_on_shipped_traces_and_reference_costs():
    import gymnasium as gym
    from gymnasium.utils.env_checker import check_env

    import lede_env  # noqa: F401 - registers the envs
    from lede_env.config import studied_task
    from lede_env.replay import best_static, useful_actions
    from lede_env.stopping import NO_STOP
    from dataclasses import replace

    env = gym.make("LEDE-Llama3-v1")
    u = env.unwrapped
    # the task the demo trains in: only what the env resolves differs from the studied settings
    assert set(u.task_config.differences(studied_task())) == {"exit_layers", "reward_lambda"}
    assert u.trace_set.manifest["hidden"] is False  # the shipped file, not a local trace build
    assert u.profile.source == "reference" and "reference_machine" in u.profile.meta
    # the shipped best-static search is the one this env would run (lambda of the relative reward)
    rules = replace(u.rules.without_overhead(), stop_rule=NO_STOP)
    traces = [u.trace_set.traces[i] for i in u.playable]
    assert u.best_static() == best_static(traces, rules, u.max_new_tokens, useful_actions(rules))
    assert u.reward_lambda == pytest.approx(max(1.0, u.best_static()[1]))
    check_env(u)


@pytest.mark.embedded
def test_v1_returns_do_not_depend_on_the_kernels_of_the_machine():
    """Two kernel settings in one process (as two machines would pick) give identical returns for
    the same actions: no number of the task is computed on the machine at hand."""
    import gymnasium as gym

    import lede_env  # noqa: F401
    from lede_env.model import get_bundle

    stack = get_bundle(None).stack
    try:
        stack.set_kernels("blas")
        a = _returns(gym.make("LEDE-Llama3-v1"))
        stack.set_kernels("default")
        b = _returns(gym.make("LEDE-Llama3-v1"))
    finally:
        stack.set_kernels("auto")
    assert a == b and len(set(a)) > 1


def test_trace_files_round_trip_without_hidden_states(tiny, tmp_path):
    """write_trace_file keeps every array the replay reads, exactly (token ids back as int64) and
    drops the hidden states (an [N, 0] array), which the compact observation never reads."""
    from lede_env.traces import read_trace_file, write_trace_file

    ts = tiny[2]
    write_trace_file(ts, tmp_path / "t.safetensors")
    back = read_trace_file(tmp_path / "t.safetensors")
    assert back.manifest["hidden"] is False and len(back) == len(ts)
    for a, b in zip(ts.traces, back.traces):
        assert (a.id, a.category, a.eos) == (b.id, b.category, b.eos)
        for name in ("prompt", "generated", "draft", "lens_arg", "draft_prob", "top1", "entropy"):
            x, y = getattr(a, name), getattr(b, name)
            assert x.dtype == y.dtype and np.array_equal(x, y), name
        assert b.hidden.shape == (a.n, 0)


def test_a_full_observation_refuses_traces_without_hidden_states(tiny, tmp_path):
    from lede_env.env import LEDEEnv
    from lede_env.traces import read_trace_file, write_trace_file

    b, _, built, prof = tiny
    write_trace_file(built, tmp_path / "t.safetensors")
    ts = read_trace_file(tmp_path / "t.safetensors")
    kw = dict(trace_set=ts, profile=prof, eos_ids=b.eos_ids, k_max=4, max_new_tokens=32, progress=False)
    LEDEEnv.with_objects(obs_kind="compact", **kw).reset(seed=0)
    with pytest.raises(ValueError, match="hidden states"):
        LEDEEnv.with_objects(obs_kind="full", **kw)


def test_a_damaged_shipped_trace_file_is_never_trusted(monkeypatch, tmp_path):
    from lede_env import traces

    assert_damaged_shipped_file_ignored(monkeypatch, traces, "PACKAGED_TRACES",
                                        lambda key: traces.shipped_traces(key, {}), "m/k", "t.safetensors", tmp_path)


def test_a_reference_profile_that_does_not_ship_names_the_ways_out(tiny):
    from lede_env.costs import reference_profile
    from lede_env.mdp import ObservationConfig

    with pytest.raises(ValueError, match="cost_profile='measured'"):
        reference_profile(tiny[0], tiny[1], 4, ObservationConfig())


@pytest.mark.embedded
def test_v1_finds_its_shipped_best_static_search_and_trees_get_their_own_key():
    """Tree actions (issue 37) left the v1 task's static-search key as it was: its shipped search is
    still found by it; the same task with tree actions is another search."""
    import json
    import warnings

    import gymnasium as gym

    import lede_env  # noqa: F401 - registers the envs
    from lede_env.trace_env import PACKAGED_STATIC, static_search_key

    u = gym.make("LEDE-Llama3-v1").unwrapped
    traces, rules = u.static_setting()
    assert u.actions.tree_budgets == ()
    assert static_search_key(traces, rules, u.max_new_tokens) in json.loads(PACKAGED_STATIC.read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = gym.make("LEDE-Llama3-v1", tree_budgets=(4,)).unwrapped
    traces_t, rules_t = t.static_setting()
    assert t.actions.tree_budgets == (4,)
    assert static_search_key(traces_t, rules_t, t.max_new_tokens) != static_search_key(traces, rules, u.max_new_tokens)
