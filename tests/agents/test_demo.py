"""``lede demo``'s pipeline runs end to end at a tiny budget on a tiny model, in its default
setting (relative reward, calibrated in-round stop, context actions, compact observation, trace_q
and DiscreteCQL, multi-category evaluation with a live subset), so the verb never rots."""

from __future__ import annotations

import json


def test_demo_runs_end_to_end_on_a_tiny_model(tmp_path, monkeypatch):
    from agents.pipeline import DemoConfig, run_demo
    from lede_env.config import studied_task
    from lede_env.model import save_tiny_model

    monkeypatch.setenv("LEDE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))  # run_demo points it at its out dir
    tiny = save_tiny_model(tmp_path / "tiny", num_layers=4)
    task = studied_task(model=str(tiny), prompts="humaneval[0:2]+gsm8k[300:302]", calib_prompts="humaneval[100:104]",
                        max_new_tokens=12, cost_profile="analytic")
    cfg = DemoConfig(task=task, eval_prompts="humaneval[24:26]+specbench{writing}[0:2]", episodes=6, steps=40,
                     out_dir=str(tmp_path / "demo"), wandb="disabled", live_per_category=1)
    out = run_demo(cfg, progress=False)
    assert out["agent"] in cfg.algos
    cats = {r["category"] for r in out["trace"]}
    assert {"all", "code", "writing"} <= cats
    assert all(r["identical_to_ar"] for r in out["live"])  # every method lossless
    policy = json.loads((tmp_path / "demo" / "policy" / "policy.json").read_text())
    assert policy["observation"]["kind"] == "compact" and policy["stop_rule"]["kind"] == "calibrated"
    # context actions, and a compact observation without head statistics but with the context
    # drafter's features (every learner reads the same layout as the env: flat_layout)
    assert policy["context_lengths"] == [1, 2, 3, 4, 6, 8] and policy["fallback_action"] >= 0
    assert [k for k, _ in policy["observation_layout"]] == ["experience", "history", "progress", "context"]
    assert (tmp_path / "demo" / "results.md").exists()
    # `lede evaluate agent:DIR` rebuilds the env the demo's agent was trained in from the agent alone
    from lede_env.config import TaskConfig
    from lede_env.task import task_for

    trained = TaskConfig.from_dict(policy["task_config"])
    rebuilt = task_for([f"agent:{tmp_path / 'demo' / 'policy'}"], {}, {"cost_profile": "measured"}, model=str(tiny),
                       prompts=task.prompts, max_new_tokens=12)
    assert rebuilt.differences(trained) == {}
    # and that is the demo's task, with the exits and lambda it resolved
    assert set(trained.differences(task)) == {"exit_layers", "reward_lambda"}
