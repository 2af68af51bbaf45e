"""One definition of each metric (:mod:`lede_env.metrics`): tokens per round, acceptance,
throughput, speedup, round costs; the trace env, the live decoder, ``summary()`` and both ``lede
evaluate`` tables agree on the same run."""

from __future__ import annotations

import math

import pytest


def test_metric_definitions_on_an_eight_token_run():
    """An 8-token run: the prefill's token, then rounds emitting 4 and 3 tokens (3 of 4 and 2 of 4
    drafts accepted). Tokens per round = 7 / 2 = 3.5 (not 8 / 2 = 4.00 as ``summary()`` said, nor
    8 / 3 = 2.67 as the live table said); acceptance = 5 / 8; AR's acceptance is undefined (NaN,
    printed "-"), its tokens per round 1.0."""
    from lede_env.decoding import GenerationResult, RoundRecord
    from lede_env.generate import LedeOutput
    from lede_env.metrics import RoundTotals, acceptance, format_metric, speedup, tokens_per_round

    rounds = [RoundRecord(action=1, exit_layer=2, draft_len=4, accepted=3, emitted=4, cost=2.0, seconds=0.2),
              RoundRecord(action=1, exit_layer=2, draft_len=4, accepted=2, emitted=3, cost=2.0, seconds=0.2)]
    res = GenerationResult(tokens=list(range(8)), rounds=rounds, seconds=0.5)
    assert res.tokens_per_round == 3.5 and res.acceptance_rate == 5 / 8
    tot = RoundTotals.of(rounds)
    assert (tot.tokens_per_round, tot.acceptance, tot.throughput, tot.cost_per_round) == (3.5, 5 / 8, 7 / 4, 2.0)
    assert tot.measured_cost_per_round(0.05) == pytest.approx(4.0)  # 0.2 s a round over a 0.05 s AR step
    line = LedeOutput("", list(range(8)), res, "max_new_tokens").summary()
    assert "3.50 tokens per round" in line and "acceptance 0.62" in line and "16.0 tokens/s" in line
    ar = GenerationResult(tokens=[0, 1, 2], rounds=[RoundRecord(0, 0, 0, 0, 1), RoundRecord(0, 0, 0, 0, 1)])
    assert ar.tokens_per_round == 1.0 and math.isnan(ar.acceptance_rate)
    assert "acceptance -," in LedeOutput("", [0, 1, 2], ar, "max_new_tokens").summary()
    assert math.isnan(acceptance(0, 0)) and math.isnan(tokens_per_round(0, 0)) and format_metric(float("nan")) == "-"
    assert speedup(10, 1.0, 10, 2.0) == 2.0 and speedup(20, 2.0, 10, 2.0) == 2.0  # tokens/s ratios


def test_trace_env_live_decoder_and_tables_agree_on_metrics(tiny, tiny_env):
    """The same action sequence played in the trace env and by the real decoder (greedy: the same
    tokens) gives the same tokens per round and acceptance through the trace env's rounds, the
    decoder's GenerationResult, ``lede evaluate``'s trace table and its live table."""
    from agents.evaluate import live_eval, to_markdown, trace_eval
    from lede_env.metrics import RoundTotals

    from ..conftest import replay_live

    b, heads, ts, prof = tiny
    env = tiny_env
    actions = [5, 0, 2, 9, 1, 12, 3, 7] * 8
    checked = 0
    for idx in env.playable:
        env.reset(seed=0, options={"prompt_index": idx})
        trace_rounds, done, i = [], False, 0
        while not done:
            _, _, te, tr, info = env.step(actions[i])
            trace_rounds.append(info["round"])
            done, i = te or tr, i + 1
        live, _ = replay_live(env, b, heads, actions[:i])
        assert len(live.rounds) == len(trace_rounds)
        tt = RoundTotals.of(trace_rounds)
        assert tt.tokens == len(live.tokens) - 1  # the prefill's token is no round's
        assert live.tokens_per_round == tt.tokens_per_round == pytest.approx(tt.tokens / len(trace_rounds))
        assert live.acceptance_rate == tt.acceptance or (math.isnan(live.acceptance_rate) and math.isnan(tt.acceptance))
        assert live.totals.cost == pytest.approx(tt.cost)
        checked += 1
    assert checked == len(env.playable) > 1

    names = ["ar", "hf", "static:2,3", "heuristic:1"]
    dec = env.make_decoder(b, heads)
    trace_rows = {r["policy"]: r for r in trace_eval(env, names, by_category=False)}
    live_rows = {r["policy"]: r for r in live_eval(env, dec, names, progress=False, by_category=False)}
    for n in ("ar", "static:2,3", "heuristic:1"):
        assert live_rows[n]["identical_to_ar"]
        assert live_rows[n]["tokens_per_round"] == pytest.approx(trace_rows[n]["tokens_per_round"])
        assert live_rows[n]["acceptance"] == pytest.approx(trace_rows[n]["acceptance"], nan_ok=True)
        # the profile's predicted round cost is the trace env's: round tokens / throughput
        assert live_rows[n]["cost_per_round_predicted"] == pytest.approx(
            trace_rows[n]["tokens_per_round"] / trace_rows[n]["throughput"])
    # AR: one token a round, nothing drafted: acceptance undefined in both tables, printed "-";
    # its rounds are the AR step the measured costs are expressed in
    for rows in (trace_rows, live_rows):
        assert rows["ar"]["tokens_per_round"] == 1.0 and math.isnan(rows["ar"]["acceptance"])
        cells = [c.strip() for c in to_markdown([rows["ar"]]).splitlines()[2].strip("|").split("|")]
        assert cells[list(rows["ar"]).index("acceptance")] == "-"
    assert live_rows["ar"]["cost_per_round_predicted"] == pytest.approx(1.0)
    assert live_rows["ar"]["cost_per_round_measured"] == pytest.approx(1.0)
    assert live_rows["static:2,3"]["cost_per_round_measured"] > 0
    hf = live_rows["hf"]  # plain greedy transformers: AR rounds, untimed by lede
    assert hf["tokens_per_round"] == 1.0 and math.isnan(hf["acceptance"])
    assert math.isnan(hf["cost_per_round_predicted"]) and math.isnan(hf["cost_per_round_measured"])

