"""``lede leaderboard``'s small version on a tiny model: every baseline and three learners over
three seeds, scored 0 = always-AR and 100 = the oracle with intervals, in one Markdown table."""

from __future__ import annotations

import math


def test_leaderboard_ranks_learners_and_baselines_on_held_out_prompts(tmp_path, monkeypatch):
    from agents.leaderboard import LeaderboardConfig, run_leaderboard
    from lede_env.config import studied_task
    from lede_env.model import save_tiny_model

    monkeypatch.setenv("LEDE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    tiny = save_tiny_model(tmp_path / "tiny", num_layers=4)
    task = studied_task(model=str(tiny), prompts="humaneval[0:2]+gsm8k[300:302]", calib_prompts="humaneval[100:104]",
                        max_new_tokens=12, cost_profile="analytic")
    cfg = LeaderboardConfig(task=task, eval_prompts="humaneval[24:26]+specbench{writing}[0:2]",
                            algos=("discrete_bc", "sb3_offline_dqn", "trace_q"), seeds=(0, 1, 2), steps=30, episodes=6,
                            out_dir=str(tmp_path / "lb"))
    res = run_leaderboard(cfg, progress=False)
    rows = {(r["policy"], r["category"]): r for r in res["rows"]}
    # the references score what they are defined to: always-AR 0, the oracle 100, everywhere
    for cat in ("all", "code", "writing"):
        assert abs(rows["ar", cat]["score"]) < 1e-9 and abs(rows["oracle", cat]["score"] - 100) < 1e-9
    for algo in cfg.algos:
        r = rows[algo, "all"]
        lo, hi = r["score_ci"]
        assert lo <= r["score"] <= hi  # three seeds and four prompts: a real interval
        assert r["train_seconds"] > 0 and r["policy_us_per_round"] > 0
        assert not math.isnan(r["score_iqm"])
    names = {p for p, _ in rows}
    assert "del" in names and any(p.startswith("static best") for p in names)
    assert any(p.startswith("copy-else:8,") for p in names) and any(p.startswith("heuristic:") for p in names)
    md = (tmp_path / "lb" / "leaderboard.md").read_text()
    assert "score [95% CI]" in md and "## Score per category" in md and "trace_q" in md
    # the dataset's reference scores are the same 0 and 100: minari's normalized score is lede's
    import minari

    from agents.evaluate import trace_eval

    ds = minari.load_dataset(cfg.dataset_id)
    env = ds.recover_environment()
    for r in trace_eval(env, ["static:best", "del"], static_best=env.unwrapped.best_static()[0], by_category=False,
                        intervals=False):
        want = 100 * float(minari.get_normalized_score(ds, r["mean_return"]))
        assert abs(r["score"] - want) < 1e-6, (r["policy"], r["score"], want)
