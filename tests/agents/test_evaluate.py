"""The evaluation harness on the tiny model: trace-env and live rows, identity to AR."""

from __future__ import annotations

import pytest

from agents.evaluate import live_eval, to_markdown, trace_eval, write_results
from agents.policies import best_static_action
from lede_env.decoding import SelfSpeculativeDecoder


def test_trace_and_live_eval(tiny, tiny_env, tmp_path):
    b, heads, ts, prof = tiny
    best, _ = best_static_action(tiny_env)
    names = ["ar", "static:best", "static:2,3", "heuristic:2", "del", "oracle"]
    rows = trace_eval(tiny_env, names, best)
    by = {r["policy"]: r for r in rows if r["category"] == "all"}
    cats = {t.category for t in ts.traces}
    assert {r["category"] for r in rows} == {"all"} | cats  # the tiny prompts have two categories
    assert len(rows) == len(names) * (1 + len(cats))
    assert by["ar"]["throughput"] == pytest.approx(1.0)  # AR pays no feature overhead
    assert by["oracle"]["oracle_share"] == pytest.approx(1.0)
    assert all(r["oracle_share"] <= 1.0 + 1e-9 for r in rows)
    dec = SelfSpeculativeDecoder(b.stack, heads, 4, b.eos_ids, True, prof, tiny_env.obs_config)
    records = {}
    live = live_eval(tiny_env, dec, ["ar", "hf", "hf-lookup:3", "static:best", "confidence:2,4,0.5", "oracle"], best,
                     progress=False, records=records)
    assert all(r["identical_to_ar"] for r in live)
    assert "transformers prompt_lookup_num_tokens=3" in {r["policy"] for r in live}
    assert all(r["speedup_vs_ar"] == 1.0 for r in live if r["policy"] == "ar")
    assert sum(len(recs) for recs in records.values()) == 4 * len(tiny_env.playable)  # every method but hf*
    conf = [r for rec in records["confidence:2,4,0.5"] for r in rec["rounds"]]
    assert all(r["draft_len"] <= 4 for r in conf)
    write_results(tmp_path, "live", live)
    assert (tmp_path / "live.csv").exists() and "speedup_vs_ar" in (tmp_path / "live.md").read_text()
    assert to_markdown(rows).count("\n") == len(rows) + 1
    with pytest.raises(ValueError, match="Unknown policy"):
        trace_eval(tiny_env, ["nonsense"], best)
    with pytest.raises(ValueError, match="hf-lookup:10"):
        trace_eval(tiny_env, ["hf-lookup:zero"], best)


def test_cli_help():
    from typer.testing import CliRunner

    from agents.cli import app

    out = CliRunner().invoke(app, ["--help"])
    assert out.exit_code == 0
    for verb in ("traces", "exits", "profile", "collect", "train", "export", "evaluate", "generate", "demo"):
        assert verb in out.output


def test_confidence_policy_stops_where_the_trace_says(tiny, tiny_env):
    """In the trace env a confidence policy drafts exactly up to the first draft token whose
    draft-head probability is below the threshold (that token included), K as a cap."""
    from agents.evaluate import make_policy
    from lede_env.replay import stopped_draft_len

    b, heads, ts, prof = tiny
    assert stopped_draft_len([0.9, 0.4, 0.9], 3, 0.5) == 2
    assert stopped_draft_len([0.9, 0.9, 0.9], 3, 0.5) == 3
    assert stopped_draft_len([0.1], 3, 0.5) == 1
    assert stopped_draft_len([0.1, 0.1], 2, None) == 2
    pol = make_policy("confidence:2,4,0.3", tiny_env)
    u = tiny_env.unwrapped
    i = u.actions.exit_layers.index(2)
    with u.playing(pol):
        obs, _ = u.reset(seed=0, options={"prompt_index": 0})
        _, _, _, _, info = u.step(pol.act(None))
    probs = u.trace.draft_prob[1:5, i]
    below = [j for j, p in enumerate(probs) if p < 0.3]
    assert info["round"]["draft_len"] == min(4, below[0] + 1 if below else 4)
    assert u.rules.stop_threshold is None  # restored after the block
    for bad in ("confidence:2,4", "confidence:2,4,1.5", "confidence:9,4,0.5"):
        with pytest.raises(ValueError):
            make_policy(bad, tiny_env)


def test_policy_list_parsing():
    from lede_env.policies import split_policies

    assert split_policies("ar,static:4,2,confidence:4,8,0.5,del") == ["ar", "static:4,2", "confidence:4,8,0.5",
                                                                      "del"]


def test_plots(tmp_path):
    from agents.plots import plot_choices, plot_speedup_by_category

    rows = [{"policy": p, "category": c, "speedup_vs_ar": v}
            for p, c, v in [("ar", "all", 1.0), ("agent", "all", 1.2), ("ar", "code", 1.0), ("agent", "code", 1.4)]]
    assert plot_speedup_by_category(rows, tmp_path / "s.png").stat().st_size > 1000
    recs = [{"prompt_id": "0", "category": "code", "tokens": [1, 2, 3, 4],
             "rounds": [dict(action=3, exit_layer=2, draft_len=2, accepted=2, emitted=3),
                        dict(action=0, exit_layer=0, draft_len=0, accepted=0, emitted=1)]}]
    assert plot_choices(recs, tmp_path / "c.png", (1, 2, 3), 4).stat().st_size > 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.png", "s.png"]  # no temporary files left
    with pytest.raises(ValueError, match="No rounds"):
        plot_choices([], tmp_path / "x.png", (1, 2), 4)


def test_evaluation_logs_to_wandb_offline_without_network(tiny_env, tmp_path, monkeypatch):
    from agents.evaluate import log_to_wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    rows = trace_eval(tiny_env, ["ar", "oracle"])
    run_dir = log_to_wandb("offline", "lede-test", "eval", {"prompts": "tiny"}, {"trace_eval": rows}, tmp_path)
    assert run_dir is not None and str(tmp_path) in run_dir
    assert list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))  # synced later with `wandb sync`
    assert log_to_wandb("disabled", "p", "n", {}, {"trace_eval": rows}, tmp_path / "none") is None
    with pytest.raises(ValueError, match="offline"):
        log_to_wandb("cloud", "p", "n", {}, {}, tmp_path)


def test_static_best_label_names_the_action_kind():
    """``static:best`` is labelled by what the best static action is: an exit draft, a copy
    from the context, a token tree or AR (the action map's own decoding)."""
    from types import SimpleNamespace

    from agents.evaluate import label
    from lede_env.mdp import ActionMap

    acts = ActionMap((2, 4), 4, (2, 4), (3, 8))
    env = SimpleNamespace(unwrapped=SimpleNamespace(actions=acts))
    assert label("static:best", env, acts.encode_tree(8)) == "static best (tree of <= 8 nodes)"
    assert label("static:best", env, acts.encode(0, 4)) == "static best (context draft <= 4)"
    assert label("static:best", env, acts.encode(4, 3)) == "static best (E=4, K=3)"
    assert label("static:best", env, 0) == "static best (AR)"
    assert label("static:0,4", env, 0) == "static:0,4"
