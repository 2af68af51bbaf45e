"""An exported agent carries every setting of the env it was trained in, and every command that
plays it (``lede evaluate``, ``lede generate``, :class:`~lede_env.generate.Lede`, transformers'
``generate`` with ``custom_generate=lede_generate``) builds that env or decoder from the agent
alone: output identical to transformers' greedy ``generate``; a setting given beside the agent
that contradicts it is one error line naming both values (exit 2 on the command line); agents
exported before the settings were recorded still play."""

from __future__ import annotations

import json
import shutil

import pytest

from .tiny_agents import AGENTS, HELD_OUT, MAX_NEW, PROMPT, TRAIN, build_agent, greedy_tokens, one_line, run_cli
from .tiny_agents import tiny_root  # noqa: F401 - the module's fixture


@pytest.fixture(scope="module", params=sorted(AGENTS))
def agent(request, tiny_root):  # noqa: F811
    root, tiny = tiny_root
    return request.param, build_agent(root, tiny, request.param), tiny


def _norm(v):
    return list(v) if isinstance(v, tuple) else v


def test_export_writes_every_task_setting(agent):
    from lede_env.env import LEDEEnv
    from lede_env.task import TASK_KEYS

    name, path, _ = agent
    cfg = json.loads((path / "policy.json").read_text())
    settings = cfg["env"]
    assert set(settings) == set(TASK_KEYS)
    for k, v in AGENTS[name].items():
        assert _norm(settings[k]) == _norm(v), k
    # they are LEDEEnv keyword arguments, and a valid task config of the same values (lede_env.config)
    import inspect

    from lede_env.config import TaskConfig

    assert set(settings) <= set(inspect.signature(LEDEEnv).parameters)
    again = TaskConfig.from_kwargs(**settings).to_kwargs()
    assert {k: again[k] for k in settings} == settings


def test_the_exported_task_config_rebuilds_the_training_env(agent):
    """policy.json holds the resolved task config of the env the agent was trained in: the env it
    builds plays the same task (equal config; its task settings are the agent's ``"env"``)."""
    from lede_env.config import TaskConfig
    from lede_env.env import LEDEEnv
    from lede_env.task import TASK_KEYS, normalise

    _, path, _ = agent
    cfg = json.loads((path / "policy.json").read_text())
    task = TaskConfig.from_dict(cfg["task_config"])
    env = LEDEEnv(task, progress=False)
    assert env.task_config == task and env.reward_lambda == task.reward.lambda_
    flat = task.to_kwargs()
    assert normalise({k: flat[k] for k in TASK_KEYS}) == cfg["env"]


def test_the_task_settings_are_the_task_configs_heads_observation_rules_and_reward():
    """TASK_KEYS: every setting of lede_env.config.TaskConfig but the model, the prompts, the
    token budget, sampling, the backend and the wall-clock cost switch (chosen where an agent is
    played)."""
    from lede_env.config import FLAT_KEYS
    from lede_env.task import TASK_KEYS

    played_where = {"model", "device", "dtype", "prompts", "max_new_tokens", "temperature", "top_p", "top_k",
                    "backend", "cost"}
    assert set(TASK_KEYS) == set(FLAT_KEYS) - played_where


def test_lede_evaluate_plays_the_agent_from_its_settings_alone(agent, tmp_path):
    name, path, tiny = agent
    out = tmp_path / "eval"
    r = run_cli("evaluate", "--model", tiny, "--policies", f"ar,hf,agent:{path},agent-unguarded:{path}",
                "--prompts", HELD_OUT, "--train-prompts", TRAIN, "--max-new-tokens", MAX_NEW, "--no-plots",
                "--wandb", "disabled", "--out", out)
    assert r.exit_code == 0, r.output
    live = json.loads((out / "live_eval.json").read_text())
    labels = {row["policy"] for row in live}
    assert {"ar", "hf", f"agent:{path}", f"agent-unguarded:{path}"} <= labels
    # every method's tokens equal lede's AR loop's and transformers' greedy generate's ("hf")
    assert all(row["identical_to_ar"] for row in live)
    trace = json.loads((out / "trace_eval.json").read_text())
    assert f"agent:{path}" in {row["policy"] for row in trace}


def test_lede_generate_plays_the_agent(agent):
    from lede_env.model import get_bundle

    name, path, tiny = agent
    r = run_cli("generate", PROMPT, "--model", tiny, "--policy", path, "--max-new-tokens", MAX_NEW)
    assert r.exit_code == 0, r.output
    tok = get_bundle(str(tiny)).tokenizer
    want = tok.decode(greedy_tokens(tiny, PROMPT, MAX_NEW), skip_special_tokens=True)
    assert one_line(want) in one_line(r.output)


def test_lede_and_the_transformers_hook_play_the_agent(agent):
    import torch

    from lede_env.generate import Lede
    from lede_env.hf import lede_generate
    from lede_env.model import get_bundle
    from lede_env.policies import ExportedPolicy
    from lede_env.prompts import encode_prompt

    name, path, tiny = agent
    want = greedy_tokens(tiny, PROMPT, MAX_NEW)
    lede = Lede(str(tiny), policy=str(path))
    assert lede.generate(PROMPT, max_new_tokens=MAX_NEW).tokens == want
    pol = ExportedPolicy(path)
    assert lede.decoder.actions == pol.actions and lede.decoder.observer.config == pol.obs_config
    kw = AGENTS[name]
    assert lede.decoder.bonus == kw.get("bonus", True) and lede.decoder.reuse == kw.get("reuse", True)
    assert lede.heads.kind == kw["head_kind"] and lede.heads.draft_vocab == kw["draft_vocab"]
    b = get_bundle(str(tiny))
    ids = encode_prompt(b.tokenizer, PROMPT)[None]
    out = b.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW,
                           custom_generate=lede_generate, lede_policy=str(path))
    assert out[0, ids.shape[1]:].tolist() == want


#: (command, option, value) that contradicts the "compact" agent's settings
CONTRADICTIONS = [
    ("evaluate", "--k-max", "8", "k_max"),
    ("evaluate", "--exits", "2", "exit_layers"),
    ("evaluate", "--head-kind", "affine-kl", "head_kind"),
    ("evaluate", "--draft-vocab", "8192", "draft_vocab"),
    ("evaluate", "--calib-prompts", "humaneval[100:102]", "calib_prompts"),
    ("evaluate", "--cost-profile", "measured", "cost_profile"),
    ("evaluate", "--obs-kind", "full", "obs_kind"),
    ("evaluate", "--stop-rule", "none", "stop_rule"),
    ("evaluate", "--context-draft", "2", "context_draft"),
    ("evaluate", "--context-lengths", "1,2", "context_lengths"),
    ("evaluate", "--no-context-datastore", None, "context_datastore"),
    ("generate", "--head-kind", "affine-kl", "head_kind"),
    ("generate", "--calib-prompts", "humaneval[100:102]", "calib_prompts"),
    ("generate", "--context-draft", "2", "context_draft"),
    ("generate", "--no-context-datastore", None, "context_datastore"),
]


@pytest.mark.parametrize("command,option,value,key", CONTRADICTIONS)
def test_an_option_that_contradicts_the_agent_is_one_error_line(tiny_root, command, option, value,  # noqa: F811
                                                                 key, tmp_path):
    root, tiny = tiny_root
    path = build_agent(root, tiny, "compact")
    agent_value = json.loads((path / "policy.json").read_text())["env"][key]
    given = [option] + ([value] if value is not None else [])
    if command == "evaluate":
        args = ["evaluate", "--model", tiny, "--policies", f"ar,agent:{path}", "--prompts", HELD_OUT,
                "--train-prompts", TRAIN, "--max-new-tokens", MAX_NEW, "--no-plots", "--wandb", "disabled",
                "--out", tmp_path / "eval", *given]
    else:
        args = ["generate", PROMPT, "--model", tiny, "--policy", path, "--max-new-tokens", MAX_NEW, *given]
    r = run_cli(*args)
    text = one_line(r.output)
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output and text.startswith("error:")
    shown = {"k_max": "8", "exit_layers": "[2]", "context_lengths": "[1, 2]", "stop_rule": "None",
             "context_datastore": "False", "context_draft": "2", "draft_vocab": "8192"}.get(key, repr(value))
    assert f"{key}={shown}" in text and f"{key}={agent_value!r}" in text, text
    assert not (tmp_path / "eval").exists()  # refused before anything ran


def test_lede_refuses_an_argument_that_contradicts_the_agent(tiny_root):  # noqa: F811
    from lede_env.generate import Lede

    root, tiny = tiny_root
    path = build_agent(root, tiny, "compact")
    for kw, shown in ((dict(k_max=8), "k_max=8"), (dict(head_kind="affine-kl"), "head_kind='affine-kl'"),
                      (dict(context_draft=1), "context_draft=1")):
        with pytest.raises(ValueError) as e:
            Lede(str(tiny), policy=str(path), **kw)
        msg = str(e.value)
        assert "\n" not in msg and shown in msg and str(path) in msg
    # agreeing with the agent is fine
    assert Lede(str(tiny), policy=str(path), k_max=4, calib_prompts="humaneval[100:104]").decoder.actions.k_max == 4


def test_agents_exported_before_the_settings_were_recorded_still_play(agent, tmp_path):
    """policy.json without ``env`` and ``task_config`` (the previous format): its settings are read from the old keys
    (missing ones: the old defaults), calib_prompts and cost_profile, which it never recorded,
    from the command's options; the output stays greedy."""
    from lede_env.generate import Lede
    from lede_env.task import agent_settings

    name, path, tiny = agent
    old = tmp_path / "old"
    shutil.copytree(path, old)
    cfg = json.loads((old / "policy.json").read_text())
    new = cfg.pop("env")
    cfg.pop("task_config")  # (the previous format had neither)
    (old / "policy.json").write_text(json.dumps(cfg))
    # (the previous format had no layer-reuse switch: reuse on, as every command then played it)
    assert agent_settings(cfg) == {k: v for k, v in new.items() if k not in ("calib_prompts", "cost_profile")} | {
        "reuse": True}
    calib = AGENTS[name]["calib_prompts"]
    lede = Lede(str(tiny), policy=str(old), calib_prompts=calib)
    assert lede.generate(PROMPT, max_new_tokens=MAX_NEW).tokens == greedy_tokens(tiny, PROMPT, MAX_NEW)
    r = run_cli("evaluate", "--model", tiny, "--policies", f"ar,agent:{old}", "--prompts", HELD_OUT,
                "--train-prompts", TRAIN, "--max-new-tokens", MAX_NEW, "--no-plots", "--wandb", "disabled",
                "--calib-prompts", calib, "--cost-profile", "analytic", "--out", tmp_path / "eval")
    assert r.exit_code == 0, r.output
    assert all(row["identical_to_ar"] for row in json.loads((tmp_path / "eval" / "live_eval.json").read_text()))


def test_a_cost_profile_name_agrees_with_an_agents_profile_made_that_way(tmp_path):
    """An agent trained on a dataset records the cost profile itself (a dict whose ``source`` says
    how it was made): ``--cost-profile analytic`` beside an agent with an analytic profile dict is
    no contradiction (the kill-safety run of ``lede evaluate`` gives it), another way of making
    it is."""
    from lede_env.task import settings_for, task_defaults

    analytic = {"source": "analytic", "layer": [1.0, 1.0], "lm_head": 0.5, "overhead": 0.0, "slope": 0.07}
    in_loop = {**analytic, "source": "in-loop"}
    for name, profile in (("a", analytic), ("b", in_loop)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "policy.json").write_text(json.dumps({"env": {**task_defaults(), "cost_profile": profile}}))
    a, b = tmp_path / "a", tmp_path / "b"
    assert settings_for([f"agent:{a}"])["cost_profile"] == analytic  # (nothing given: the agent's own)
    assert settings_for([f"agent:{a}"], {"cost_profile": "analytic"})["cost_profile"] == "analytic"
    assert settings_for([f"agent:{b}"], {"cost_profile": "measured"})["cost_profile"] == "measured"
    for folder, given in ((a, "measured"), (a, "isolated"), (b, "analytic"), (a, "costs.json")):
        with pytest.raises(ValueError, match=f"cost_profile='{given}' \\(given\\) contradicts the agent's "
                                             "cost_profile={"):
            settings_for([f"agent:{folder}"], {"cost_profile": given})


def test_a_copy_policy_adds_its_copy_length_to_the_commands_own():
    """With the v1 task's copy lengths as the command's defaults, naming static:0,8 keeps them all
    (the action space stays the task's); with none, it switches on just its own."""
    from lede_env.config import STUDIED_SETTINGS
    from lede_env.task import settings_for

    v1 = {k: v for k, v in STUDIED_SETTINGS.items() if k != "prompts"}
    assert settings_for(["static:0,8"], {}, v1)["context_lengths"] == [1, 2, 3, 4, 6, 8]
    assert settings_for(["static:0,5"], {}, v1)["context_lengths"] == [1, 2, 3, 4, 5, 6, 8]
    assert settings_for(["static:0,8"])["context_lengths"] == [8]


def test_a_tree_policy_switches_its_tree_action_on():
    """tree:B and tree-rule:B,L need a tree action of B nodes: switched on beside the command's own
    budgets (with a datastore kept for the trees alone), or a one-line error where the budgets are
    fixed without it."""
    from lede_env.task import settings_for

    s = settings_for(["tree:4"], {}, {"context_datastore": True})
    assert s["tree_budgets"] == [4] and s["context_datastore"] is True and s["context_lengths"] == []
    assert settings_for(["tree:4", "tree-rule:8,2"], {}, {"tree_budgets": [2]})["tree_budgets"] == [2, 4, 8]
    assert settings_for(["guarded:tree:4"])["tree_budgets"] == [4]
    assert settings_for(["ar"])["tree_budgets"] == []
    with pytest.raises(ValueError, match=r"tree:8 verifies trees of 8 nodes, but tree_budgets=\[4\] \(given\)"):
        settings_for(["tree:8"], {"tree_budgets": [4]})
