"""The task config: every env setting in one frozen, validated, JSON-serialisable object."""

from __future__ import annotations

import inspect
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lede_env.config import FLAT_KEYS, TaskConfig


def test_defaults_are_the_envs_defaults():
    from lede_env.env import LEDEEnv

    sig = inspect.signature(LEDEEnv)  # the builder: the config, progress, render_mode and every flat setting
    env_defaults = {k: p.default for k, p in sig.parameters.items() if k in FLAT_KEYS}
    assert set(env_defaults) == set(FLAT_KEYS)  # every env setting is a config setting
    env_defaults["backend"] = "trace"  # LEDEEnv(backend=None) makes the trace env
    cfg = TaskConfig().to_kwargs()
    for k, v in env_defaults.items():
        want = list(v) if isinstance(v, tuple) else v
        assert cfg[k] == want, (k, cfg[k], want)


settings_st = st.fixed_dictionaries({}, optional={
    "max_new_tokens": st.integers(2, 512),
    "exit_layers": st.lists(st.integers(1, 40), min_size=1, max_size=6, unique=True).map(sorted),
    "head_kind": st.sampled_from(["lens", "affine", "affine-kl", "affine-kl-prev"]),
    "draft_vocab": st.one_of(st.none(), st.integers(1, 50000)),
    "obs_kind": st.sampled_from(["full", "compact"]),
    "obs_stat_exits": st.integers(0, 4),
    "obs_context_span": st.booleans(),
    "obs_context_agreement": st.booleans(),
    "k_max": st.integers(1, 12),
    "bonus": st.booleans(),
    "reuse": st.booleans(),
    "stop_threshold": st.one_of(st.none(), st.floats(0.01, 0.99)),
    "context_draft": st.integers(0, 8),
    "context_lengths": st.lists(st.integers(1, 16), max_size=4, unique=True).map(sorted),
    "reward_mode": st.sampled_from(["relative", "net", "ratio"]),
    "reward_lambda": st.one_of(st.just("auto"), st.floats(0.5, 3.0)),
    "cost_profile": st.sampled_from(["analytic", "measured"]),
})


@settings(max_examples=60, deadline=None)
@given(kw=settings_st)
def test_round_trips_through_flat_keywords_and_json(kw):
    cfg = TaskConfig.from_kwargs(**kw)
    assert TaskConfig.from_kwargs(**cfg.to_kwargs()) == cfg
    assert TaskConfig.from_json(cfg.to_json()) == cfg
    json.dumps(cfg.to_kwargs())  # JSON-serialisable, as env specs must be
    assert cfg.replace() == cfg and not cfg.differences(cfg)


def test_context_features_are_off_without_context_drafts():
    cfg = TaskConfig.from_kwargs(obs_context_span=True)
    assert cfg.observation.context_span is False
    assert TaskConfig.from_kwargs(obs_context_span=True, context_lengths=[2]).observation.context_span is True


def test_differences_name_both_values():
    a, b = TaskConfig(), TaskConfig.from_kwargs(k_max=4, obs_kind="compact")
    assert a.differences(b) == {"k_max": (8, 4), "obs_kind": ("full", "compact")}


@pytest.mark.parametrize("kw, words", [
    ({"kmax": 3}, "kmax"),
    ({"k_max": 0}, "k_max"),
    ({"reward_mode": "sum"}, "reward_mode"),
    ({"reward_lambda": -1.0}, "reward_lambda"),
    ({"stop_rule": "calibrated", "stop_threshold": 0.5}, "not both"),
    ({"stop_threshold": 1.5}, "stop_threshold"),
    ({"context_lengths": [4, 2]}, "context_lengths"),
    ({"context_draft": -1}, "context_draft"),
    ({"context_datastore": True}, "context drafts"),
    ({"temperature": 0.7}, "live"),
    ({"cost": "wallclock"}, "live"),
    ({"max_new_tokens": 1}, "max_new_tokens"),
    ({"head_kind": "mlp"}, "head_kind"),
    ({"exit_layers": "4,2"}, "exit_layers"),
    ({"obs_kind": "rich"}, "obs_kind"),
    ({"top_p": 0.0, "backend": "live"}, "top_p"),
    ({"backend": "gpu"}, "backend"),
])
def test_a_bad_setting_is_refused_by_name(kw, words):
    with pytest.raises((ValueError, TypeError), match=words):
        TaskConfig.from_kwargs(**kw)


def test_live_backend_takes_sampling_and_token_prompts():
    cfg = TaskConfig.from_kwargs(backend="live", temperature=0.7, top_k=0, prompts=[[1, 2, 3]], cost="wallclock")
    assert cfg.sampling.top_k is None and cfg.prompts == ((1, 2, 3),)
    assert TaskConfig.from_json(cfg.to_json()) == cfg


def test_from_dict_refuses_unknown_parts_and_fields():
    with pytest.raises(TypeError, match="rewards"):
        TaskConfig.from_dict({"rewards": {}})
    with pytest.raises(TypeError, match="kmax"):
        TaskConfig.from_dict({"rules": {"kmax": 3}})


def test_an_env_is_built_from_its_task_config_and_rebuilt_from_json_and_a_dataset_spec(tiny):
    """An env's ``task_config`` is the task it plays, resolved (its exits, its lambda, the profile
    charged): the env rebuilt from that config's JSON, and from the env spec a dataset of this
    version stores, plays the same task (equal config, spaces and rewards for the same actions)."""
    from agents.collect import env_spec_for
    from lede_env.env import LEDEEnv
    from lede_env.trace_env import TraceEnv

    b, heads, ts, prof = tiny
    cfg = TaskConfig.from_kwargs(k_max=4, max_new_tokens=32, obs_kind="compact", context_lengths=(1, 2),
                                 reward_mode="net")
    env = TraceEnv.with_objects(cfg, trace_set=ts, profile=prof, eos_ids=b.eos_ids, progress=False)
    c = env.task_config
    assert c.heads.exit_layers == (1, 2, 3) and c.reward.lambda_ == env.reward_lambda
    assert c.reward.cost_profile == prof.to_json() and c.differences(cfg).keys() == {"exit_layers", "reward_lambda",
                                                                                       "cost_profile"}
    from_json = LEDEEnv.with_objects(TaskConfig.from_json(c.to_json()), trace_set=ts, eos_ids=b.eos_ids,
                                     progress=False)  # the profile comes from the config's dict
    spec = env_spec_for(env, {"k_max": 4, "max_new_tokens": 32})
    from_spec = LEDEEnv.with_objects(trace_set=ts, eos_ids=b.eos_ids, progress=False, **spec.kwargs)
    for other in (from_json, from_spec):
        assert other.task_config == c and other.profile == prof
        assert other.observation_space == env.observation_space and other.action_space == env.action_space
    rewards = []
    for e in (env, from_json, from_spec):
        e.reset(seed=3, options={"prompt_index": 1})
        out = []
        for a in (1, 2, 5, 0, 3, 7, 1):
            _, r, term, trunc, _ = e.step(a)
            out.append(r)
            if term or trunc:
                break
        rewards.append(out)
    assert rewards[0] == rewards[1] == rewards[2]
    with pytest.raises(TypeError, match="with_objects"):
        LEDEEnv(cfg, trace_set=ts)
