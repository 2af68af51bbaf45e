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
    by = {r["policy"]: r for r in rows}
    assert by["ar"]["throughput"] == pytest.approx(1.0)  # AR pays no feature overhead
    assert by["oracle"]["oracle_share"] == pytest.approx(1.0)
    assert all(r["oracle_share"] <= 1.0 + 1e-9 for r in rows)
    dec = SelfSpeculativeDecoder(b.stack, heads, 4, b.eos_ids, True, prof, tiny_env.obs_config)
    live = live_eval(tiny_env, dec, ["ar", "hf", "static:best", "oracle"], best, progress=False)
    assert all(r["identical_to_ar"] for r in live)
    assert live[0]["speedup_vs_ar"] == 1.0
    write_results(tmp_path, "live", live)
    assert (tmp_path / "live.csv").exists() and "speedup_vs_ar" in (tmp_path / "live.md").read_text()
    assert to_markdown(rows).count("\n") == len(rows) + 1
    with pytest.raises(ValueError, match="Unknown policy"):
        trace_eval(tiny_env, ["nonsense"], best)


def test_cli_help():
    from typer.testing import CliRunner

    from lede_env.cli import app

    out = CliRunner().invoke(app, ["--help"])
    assert out.exit_code == 0
    for verb in ("traces", "exits", "profile", "collect", "train", "export", "evaluate", "demo"):
        assert verb in out.output
