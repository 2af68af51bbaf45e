"""Plots and `lede report` on the tiny model's evaluation results."""

from __future__ import annotations

import json

import pytest

from agents.evaluate import live_eval, trace_eval, write_results
from agents.plots import token_exits, token_exits_html
from agents.report import save_records, write_report
from lede_env.decoding import SelfSpeculativeDecoder


class _Tok:
    """Decodes token id i as the text ``t{i} `` (the tiny model has no tokenizer)."""

    def decode(self, ids):
        return "".join(f"t{i} " if i % 7 else f"t{i}\n" for i in ids)


@pytest.fixture(scope="module")
def results(tiny, tmp_path_factory):
    from lede_env.env import LEDEEnv

    b, heads, ts, prof = tiny
    env = LEDEEnv.with_objects(trace_set=ts, profile=prof, eos_ids=b.eos_ids, k_max=4, max_new_tokens=32)
    out = tmp_path_factory.mktemp("results")
    names = ["ar", "static:2,2", "del", "oracle"]
    write_results(out, "trace_eval", trace_eval(env, names))
    dec = SelfSpeculativeDecoder(b.stack, heads, 4, b.eos_ids, True, prof, env.obs_config)
    records = {}
    write_results(out, "live_eval", live_eval(env, dec, names, progress=False, records=records))
    save_records(out, records, _Tok(), env.actions.exit_layers, 4, "tiny")
    return out, records


def test_token_exits_account_for_every_token(results):
    _, records = results
    for recs in records.values():
        for rec in recs:
            exits = token_exits(rec)
            assert len(exits) == len(rec["tokens"])
            # drafted tokens carry their round's exit; the rest are the verifier's (0)
            assert sum(e > 0 for e in exits) == sum(r["accepted"] for r in rec["rounds"])
            assert exits[0] == 0  # the prefill token
    ar = records["ar"][0]
    assert token_exits(ar) == [0] * len(ar["tokens"])


def test_report_writes_plots_and_pages(results, tmp_path):
    out, records = results
    md = write_report(out, tmp_path / "rep", max_texts=1)
    files = sorted(p.name for p in (tmp_path / "rep").iterdir())
    for f in ("report.md", "report.html", "speedup_by_category.png", "throughput_by_category.png", "acceptance.png",
              "choices_del.png", "choices_oracle.png"):
        assert f in files
    assert sum(f.startswith("tokens_del_") for f in files) == 1
    text = md.read_text()
    for f in files:
        if f.endswith(".png"):
            assert f"]({f})" in text  # every picture is on the page
            assert (tmp_path / "rep" / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (tmp_path / "rep" / "report.html").read_text()
    rec = records["del"][0]
    assert token_exits_html(rec, rec["pieces"], (1, 2, 3)) in page
    stored = json.loads((out / "records.json").read_text())
    assert stored["records"]["del"][0]["pieces"] == [_Tok().decode([t]) for t in rec["tokens"]]


def test_report_needs_results(tmp_path):
    with pytest.raises(FileNotFoundError, match="lede evaluate --out"):
        write_report(tmp_path)
    (tmp_path / "trace_eval.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        write_report(tmp_path)
