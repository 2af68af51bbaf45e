"""Dataset recipes (YAML -> Minari dataset + card) and sweeps over RL algorithms."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from agents.recipes import RecipeError, build, dataset_card, load_recipe, parse_recipe
from agents.sweep import METRICS, SweepError, check_sweep, load_sweep, run_local

REPO = Path(__file__).resolve().parents[2]


def _recipe(**over) -> dict:
    d = {"id": "lede/tiny/test-recipe-v0", "episodes": 6, "seed": 2, "description": "tiny test data",
         "env": {"prompts": "humaneval[0:2]", "k_max": 4, "max_new_tokens": 32},
         "behaviour": {"mixture": {"random": 1, "oracle": 1}, "oracle_epsilon": 0.2}}
    d.update(over)
    return d


@pytest.mark.parametrize("path", sorted((REPO / "datasets").glob("*.yaml")))
def test_shipped_recipes_parse(path):
    r = load_recipe(path)
    assert r.dataset_id.startswith("lede/smollm2-135m-instruct/") and r.dataset_id.endswith("-v0")
    assert r.card_path == path.with_suffix(".md")


@pytest.mark.parametrize("bad, match", [
    ([1, 2], "YAML mapping"),
    (_recipe(epsiodes=3), r"unknown key\(s\) \['epsiodes'\]"),
    (_recipe(id="tiny-v0"), "lede/<model>/<prompt-set>-<policy-mix>-v<N>"),
    (_recipe(episodes="many"), "episodes must be int"),
    (_recipe(episodes=0), "episodes must be >= 1"),
    (_recipe(env={"prompt": "humaneval"}), r"unknown env key\(s\) \['prompt'\]"),
    (_recipe(behaviour={"mixture": {"expert": 1}}), "behaviour.mixture needs weights"),
    (_recipe(behaviour={"mixture": {"random": -1}}), "non-negative"),
    (_recipe(behaviour={"mixture": {"random": 1}, "oracle_epsilon": 2}), r"oracle_epsilon must be in \[0, 1\]"),
    (_recipe(backend="gpu"), "backend 'gpu' is not available"),
    ({k: v for k, v in _recipe().items() if k != "env"}, "missing key 'env'"),
])
def test_malformed_recipes_are_refused_with_the_fix(bad, match):
    with pytest.raises(RecipeError, match=match):
        parse_recipe(bad)


def test_recipe_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="No recipe file"):
        load_recipe(tmp_path / "nope.yaml")
    (tmp_path / "broken.yaml").write_text("id: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(tmp_path / "broken.yaml")


def test_recipe_builds_dataset_and_card(tiny, tmp_path):
    from lede_env.env import LEDEEnv

    b, heads, ts, prof = tiny
    env = LEDEEnv.with_objects(trace_set=ts, profile=prof, eos_ids=b.eos_ids, k_max=4, max_new_tokens=32)
    path = tmp_path / "tiny-recipe-v0.yaml"
    path.write_text(yaml.safe_dump(_recipe()))
    r = load_recipe(path)
    ds = build(r, progress=False, env=env)
    assert ds.total_episodes == 6
    assert ds.storage.metadata["dataset_id"] == "lede/tiny/test-recipe-v0"
    card = r.card_path.read_text()
    assert card == dataset_card(ds, r)
    assert "# `lede/tiny/test-recipe-v0`" in card and "tiny test data" in card
    assert f"| episodes | 6 |" in card and f"lede collect --recipe {path.as_posix()}" in card
    assert f"| ref_max_score (oracle) | {ds.storage.metadata['ref_max_score']:.3f} |" in card
    assert "| author | lede |" in card


def test_shipped_sweep_file_is_valid():
    cfg = load_sweep(REPO / "agents" / "sweeps" / "algorithms.yaml")
    from agents.train import ALGOS

    assert set(cfg["parameters"]["algo"]["values"]) == set(ALGOS)  # every algorithm is compared
    data = load_sweep(REPO / "agents" / "sweeps" / "datasets.yaml")
    assert len(data["parameters"]["recipe"]["values"]) == len(list((REPO / "datasets").glob("*.yaml")))
    for rec in data["parameters"]["recipe"]["values"]:
        load_recipe(REPO / rec)


@pytest.mark.parametrize("bad, match", [
    ("just text", "YAML mapping"),
    ({"method": "grid", "parameters": {"algo": {"values": ["dqn"]}, "lr": {"value": 1}}}, r"unknown parameter"),
    ({"method": "grid", "parameters": {"algo": {"values": ["sac"]}, "eval_prompts": {"value": "x"},
                                       "dataset_id": {"value": "a"}}}, "unknown algorithm"),
    ({"method": "grid", "parameters": {"algo": {"values": ["dqn"]}, "dataset_id": {"value": "a"}}},
     "eval_prompts"),
    ({"method": "sideways", "parameters": {"algo": {"value": "dqn"}}}, "not a valid W&B sweep"),
])
def test_malformed_sweeps_are_refused(bad, match):
    with pytest.raises(SweepError, match=match):
        check_sweep(bad)


def test_local_sweep_runs_every_grid_point(tiny, tmp_path):
    from agents.collect import CollectConfig, collect
    from lede_env.env import LEDEEnv

    b, heads, ts, prof = tiny
    env = LEDEEnv.with_objects(trace_set=ts, profile=prof, eos_ids=b.eos_ids, k_max=4, max_new_tokens=32)
    ds = collect(env, CollectConfig(dataset_id="lede/tiny/sweep-mixed-v0", episodes=6, seed=0), progress=False)
    cfg = check_sweep({"method": "grid", "metric": {"name": "heldout_throughput", "goal": "maximize"},
                       "parameters": {"algo": {"values": ["discrete_bc", "sb3_offline_dqn"]},
                                      "learning_rate": {"values": [1e-3, 3e-4]},
                                      "dataset_id": {"value": "lede/tiny/sweep-mixed-v0"},
                                      "steps": {"value": 20}, "batch_size": {"value": 16},
                                      "hidden": {"value": [16]}, "eval_prompts": {"value": "tiny"}}})
    rows = run_local(cfg, tmp_path, wandb_mode="disabled", progress=False,
                     train_kwargs={"dataset": ds, "env": env, "eval_env": env})
    assert sorted((r["algo"], r["learning_rate"]) for r in rows) == [
        ("discrete_bc", 3e-4), ("discrete_bc", 1e-3), ("sb3_offline_dqn", 3e-4), ("sb3_offline_dqn", 1e-3)]
    for r in rows:
        ev = json.loads((tmp_path / r["trial"] / "eval.json").read_text())
        assert r["heldout_throughput"] == ev["heldout_throughput"] > 0
    table = json.loads((tmp_path / "sweep.json").read_text())
    trials = [t for t in table if not t["trial"].startswith("reference")]
    assert [t["heldout_throughput"] for t in trials] == sorted((r["heldout_throughput"] for r in rows), reverse=True)
    assert set(trials[0]) == {"trial", "algo", "learning_rate"} | set(METRICS)  # constant parameters left out
    refs = {t["trial"]: t for t in table if t["trial"].startswith("reference")}
    assert refs["reference: ar"]["heldout_throughput"] == pytest.approx(1.0)
    assert refs["reference: oracle"]["heldout_oracle_share"] == pytest.approx(1.0)
    assert max(t["heldout_throughput"] for t in trials) <= refs["reference: oracle"]["heldout_throughput"] + 1e-9
    with pytest.raises(SweepError, match="--count"):
        run_local(dict(cfg, method="random"), tmp_path / "r")


def test_wandb_agent_command_reaches_sweep_run(tmp_path, monkeypatch):
    """The sweep file's `command` (what `wandb agent` runs on every machine) expands to
    `lede sweep-run FILE`, and that FILE's JSON is what the trial reads."""
    from wandb.sdk.launch.sweeps import utils as sweep_utils

    cfg = load_sweep(REPO / "agents" / "sweeps" / "algorithms.yaml")
    cmd = sweep_utils.create_sweep_command(cfg["command"])
    args = {"algo": {"value": "ppo"}, "learning_rate": {"value": 3e-4}}
    vars_ = sweep_utils.create_sweep_command_args({"args": args})
    assert cmd[:2] == ["lede", "sweep-run"] and cmd[2] == "${args_json_file}"
    f = tmp_path / "args.json"
    f.write_text(vars_["args_json"][0])
    seen = {}
    import agents.sweep as sw

    monkeypatch.setattr(sw, "run_trial", lambda params, out_dir, mode, wandb_run=None, **k: seen.update(params) or {})
    monkeypatch.setenv("WANDB_MODE", "disabled")
    sw.trial_from_args_file(f, tmp_path)
    assert seen == {"algo": "ppo", "learning_rate": 3e-4}


@pytest.mark.parametrize("text, match", [("random=0.5,oracle", "Bad behaviour mixture item 'oracle'"),
                                         ("random=x", "Bad behaviour mixture item"),
                                         ("random=-1", "Bad behaviour mixture item"),
                                         ("expert=1", "Unknown behaviour policy 'expert'"),
                                         ("random=0,oracle=0", "no positive weight")])
def test_bad_mixture_strings_name_the_form(text, match):
    from agents.collect import parse_mixture

    with pytest.raises(ValueError, match=match):
        parse_mixture(text)
    assert parse_mixture(" random=0.2, oracle=0.8") == {"random": 0.2, "oracle": 0.8}


def test_model_slug_makes_valid_dataset_ids():
    from agents.store import check_dataset_id, dataset_model_name

    assert dataset_model_name("meta-llama/Llama-3.2-1B") == "llama-3_2-1b"
    assert dataset_model_name("smollm2-135m-instruct") == "smollm2-135m-instruct"
    for name in ("facebook/layerskip-llama3.2-1B", "/models/My Model v2/", "Qwen/Qwen3-0.6B"):
        check_dataset_id(f"lede/{dataset_model_name(name)}/humaneval-mixed-v0")


def test_v1_recipes_build_the_registered_task_with_d4rl_style_behaviours():
    """datasets/v1-{random,medium,expert}-v0.yaml start from LEDE-Llama3-v1's settings (task:)."""
    from pathlib import Path

    from agents.recipes import RecipeError, load_recipe, parse_recipe
    from lede_env.config import STUDIED_SETTINGS, TaskConfig, studied_task

    root = Path(__file__).resolve().parents[2] / "datasets"
    mixes = {}
    for kind in ("random", "medium", "expert"):
        r = load_recipe(root / f"v1-{kind}-v0.yaml")
        assert r.dataset_id == f"lede/smollm2-135m-instruct/v1-{kind}-v0"
        assert TaskConfig.from_kwargs(**r.env) == studied_task() and set(STUDIED_SETTINGS) <= set(r.env)
        mixes[kind] = r.mixture
    assert mixes["random"] == {"random": 1.0} and "oracle" not in mixes["medium"] and mixes["expert"] == {"oracle": 1.0}
    with pytest.raises(RecipeError, match="not registered"):
        parse_recipe({"id": "lede/m/x-v0", "task": "LEDE-Llama3-v9", "env": {}, "behaviour": {"mixture": {"random": 1}}})
