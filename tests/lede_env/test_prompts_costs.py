"""Prompt specs and the default splits, prompt encoding errors, cost profiles, trace files."""

from __future__ import annotations

import json

import pytest

from lede_env.costs import CostProfile, analytic_profile
from lede_env.env import LEDEEnv
from lede_env.prompts import encode_prompt, load_prompts
from lede_env.traces import load_traces, save_traces

from ..conftest import assert_damaged_shipped_file_ignored, make_tiny


def _write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_prompt_specs(tmp_path):
    he = load_prompts("humaneval")
    assert len(he) == 164 and he[0].id == "HumanEval/0" and he[0].category == "code"
    assert [p.id for p in load_prompts("humaneval[2:5]")] == ["HumanEval/2", "HumanEval/3", "HumanEval/4"]
    assert [p.id for p in load_prompts("humaneval[0:6:3]")] == ["HumanEval/0", "HumanEval/3"]
    f = tmp_path / "q.jsonl"
    _write_jsonl(f, [{"question_id": 1, "category": "math", "turns": ["1+1?"]},
                     {"question_id": 2, "category": "writing", "turns": ["a poem", "again"]},
                     {"question_id": 3, "category": "math", "turns": ["2+2?"]}])
    assert [p.id for p in load_prompts(f"{f}{{math}}")] == ["1", "3"]
    assert [p.text for p in load_prompts(f"{f}[1:2]")] == ["a poem"]
    both = load_prompts(f"humaneval[0:1]+{f}{{writing}}")
    assert [p.id for p in both] == ["HumanEval/0", "2"]


def test_prompt_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_prompts(str(tmp_path / "missing.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question_id": 1}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        load_prompts(str(bad))
    with pytest.raises(ValueError, match="selects no prompts"):
        load_prompts("humaneval[5:5]")


def test_encode_prompt_errors():
    class Tok:
        chat_template = None

        def __call__(self, text, return_tensors=None):
            import torch

            return {"input_ids": torch.arange(len(text.split())).view(1, -1)}

    with pytest.raises(ValueError, match="empty"):
        encode_prompt(Tok(), "   ")
    with pytest.raises(ValueError, match="more than the 2 allowed"):
        encode_prompt(Tok(), "a b c", max_length=2)
    assert encode_prompt(Tok(), "a b c").tolist() == [0, 1, 2]


def test_round_cost_accounting():
    # 4 layers; layer time 1 for one token, +0.5 per extra token; head 2 (+1 per extra position)
    prof = CostProfile(num_layers=4, layer=[1.0, 1.5, 2.0, 2.5], head=[2.0, 3.0, 4.0, 5.0], draft_head=0.5,
                       overhead=0.6)
    ar = 4 * 1.0 + 2.0
    assert prof.ar_step == ar
    assert prof.round_cost(0, 0, 1) == pytest.approx((ar + 0.6) / ar)
    # E=1, K=2, bonus (3 positions), reuse: 2 drafts x (1 layer + head) + 1 extra layer-1 pass
    # + layers 2..4 on 3 positions + head on 3
    expect = 2 * (1.0 + 0.5) + 1 * 1.0 + 3 * 2.0 + 4.0 + 0.6
    assert prof.round_cost(1, 2, 3) == pytest.approx(expect / ar)
    # without reuse: no extra pass, all 4 layers on 3 positions
    expect = 2 * (1.0 + 0.5) + 4 * 2.0 + 4.0 + 0.6
    assert prof.round_cost(1, 2, 3, reuse=False) == pytest.approx(expect / ar)


def test_profile_covers_context_drafts_longer_than_k_max(tiny):
    """A profile times k = 1..K+1 positions and extrapolates past them; copies of up to 7 tokens
    with K_max = 4 need 8 positions timed, not 5 (the extrapolation made long copies look almost
    free)."""
    from lede_env.costs import profile_positions

    assert profile_positions(4) == 4
    assert profile_positions(4, (2, 7)) == 7
    assert profile_positions(8, (1, 2, 3), context_draft=12) == 12
    b, heads, ts, _ = tiny
    env = LEDEEnv.with_objects(backend="live", bundle=b, heads=heads, prompts=[t.prompt.tolist() for t in ts.traces],
                  k_max=4, context_lengths=(2, 7), cost_profile="analytic", progress=False)
    assert env.profile.max_positions == 8
    env = LEDEEnv.with_objects(backend="live", bundle=b, heads=heads, prompts=[t.prompt.tolist() for t in ts.traces],
                  k_max=4, cost_profile="analytic", progress=False)
    assert env.profile.max_positions == 5


def test_profile_round_trip(tmp_path, tiny):
    b, heads, ts, prof = tiny
    prof.save(tmp_path / "p.json")
    assert CostProfile.load(tmp_path / "p.json") == prof
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a lede cost profile"):
        CostProfile.load(tmp_path / "bad.json")
    a = analytic_profile(b.stack, 4)
    assert a.round_cost(0, 0, 1) == pytest.approx(1.01)


def test_trace_files_round_trip_and_errors(tmp_path, tiny):
    b, heads, ts, prof = tiny
    save_traces(ts, tmp_path / "tr")
    again = load_traces(tmp_path / "tr", {"exit_layers": [1, 2, 3]})
    assert [t.generated.tolist() for t in again.traces] == [t.generated.tolist() for t in ts.traces]
    assert (again.traces[0].draft == ts.traces[0].draft).all()
    with pytest.raises(ValueError, match="do not match"):
        load_traces(tmp_path / "tr", {"exit_layers": [1, 2]})
    data = (tmp_path / "tr" / "traces.safetensors").read_bytes()
    (tmp_path / "tr" / "traces.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_traces(tmp_path / "tr")
    with pytest.raises(FileNotFoundError):
        load_traces(tmp_path / "nothing")
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary folders left


def test_model_path_errors():
    from lede_env.layers import check_llama_family
    from lede_env.model import resolve_model_path

    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model_path("/no/such/model")

    class Cfg:
        model_type = "gpt2"

    with pytest.raises(ValueError, match="not Llama-family"):
        check_llama_family(Cfg())


def test_continuations_are_cached_per_prompt_and_resume(tmp_path, monkeypatch):
    """A second prompt set reuses every continuation already computed; a corrupt cache file is
    rebuilt, not trusted; nothing half-written is left beside the cache files."""
    import lede_env.continuations as cont
    from lede_env.prompts import Prompt

    monkeypatch.setenv("LEDE_CACHE_DIR", str(tmp_path))
    b = make_tiny()
    calls = []
    real = cont.greedy_decode
    monkeypatch.setattr(cont, "greedy_decode", lambda bundle, ids, n: calls.append(list(ids)) or real(bundle, ids, n))
    ps = [Prompt(str(i), "c", "") for i in range(3)]
    ids = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    first = cont.get_continuations(b, ps[:2], 8, prompt_ids=ids[:2], progress=False)
    assert len(calls) == 2
    again = cont.get_continuations(b, ps, 8, prompt_ids=ids, progress=False)
    assert calls[2:] == [ids[2]]  # only the new prompt was decoded
    assert [c.generated for c in again[:2]] == [c.generated for c in first]
    files = sorted((tmp_path / "continuations").rglob("*"))
    assert all(not f.name.startswith(".") for f in files)  # no temporary files left
    victim = next(f for f in files if f.suffix == ".json")
    victim.write_text("{truncated")
    with pytest.warns(UserWarning, match="unreadable continuation cache"):
        cont.get_continuations(b, ps, 8, prompt_ids=ids, progress=False)
    assert len(calls) == 4


def test_batched_text_is_the_greedy_text_cached_per_prompt(tmp_path, monkeypatch):
    """Batched, left-padded decoding gives each prompt the model's greedy continuation (the tiny
    model has no near-ties), cut after its first EOS; a second call decodes only new prompts."""
    import lede_env.continuations as cont
    from lede_env.prompts import Prompt

    monkeypatch.setenv("LEDE_CACHE_DIR", str(tmp_path))
    b = make_tiny()
    ps = [Prompt(str(i), "c", "") for i in range(4)]
    ids = [[5, 6, 7], [8, 9], [10, 11, 12, 13, 14, 15], [3]]
    exact = cont.get_continuations(b, ps, 12, prompt_ids=ids, progress=False, use_cache=False)
    calls = []
    real = b.model.generate
    monkeypatch.setattr(b.model, "generate", lambda **kw: calls.append(kw["input_ids"].shape[0]) or real(**kw))
    first = cont.batched_text(b, ps[:3], 12, batch_size=2, prompt_ids=ids[:3], progress=False)
    assert calls == [2, 1]
    both = cont.batched_text(b, ps, 12, batch_size=2, prompt_ids=ids, progress=False)
    assert calls == [2, 1, 1]  # the three earlier prompts came from the cache
    assert [c.generated for c in both] == [c.generated for c in exact]
    assert [c.generated for c in both[:3]] == [c.generated for c in first]
    for c in both:
        ends = [j for j, t in enumerate(c.generated) if t in b.eos_ids]
        assert ends in ([], [len(c.generated) - 1]) and c.eos == bool(ends)
    with pytest.raises(ValueError, match="batch_size >= 1"):
        cont.batched_text(b, ps, 12, batch_size=0, prompt_ids=ids)

    def encode(bundle, prompts, max_new_tokens):  # prompt "1" leaves no room for the new tokens
        if prompts[0].id == "1":
            raise ValueError("The prompt has 600 tokens, more than the 500 allowed")
        return [ids[int(prompts[0].id)]]

    monkeypatch.setattr(cont, "encode_prompts", encode)
    with pytest.warns(UserWarning, match="1 of 4 prompts leave no room for 12 new tokens"):
        kept = cont.batched_text(b, ps, 12, batch_size=2, progress=False)
    assert [c.id for c in kept] == ["0", "2", "3"] and [c.generated for c in kept] == [both[i].generated for i in (0, 2, 3)]


def test_shipped_continuations_fill_the_cache_and_a_damaged_file_is_not_trusted(tmp_path, monkeypatch):
    """A continuation shipped with the package (lede_env/data/continuations/) is used instead of
    decoding and copied into the cache; prompts it does not cover are decoded."""
    import hashlib

    import lede_env.continuations as cont
    from lede_env.prompts import Prompt

    monkeypatch.setenv("LEDE_CACHE_DIR", str(tmp_path / "cache"))
    b = make_tiny()
    ps, ids = [Prompt("0", "c", ""), Prompt("1", "c", "")], [[5, 6, 7], [8, 9]]
    exact = cont.get_continuations(b, ps, 12, prompt_ids=ids, progress=False, use_cache=False)
    ship = tmp_path / "ship"
    ship.mkdir()
    data = json.dumps({"generated": {cont._cache_key(ids[0]): exact[0].generated}}).encode()
    (ship / "tiny.json").write_bytes(data)
    (ship / "MANIFEST.json").write_text(json.dumps({f"{b.slug}/12": {"file": "tiny.json",
                                                                     "sha256": hashlib.sha256(data).hexdigest()}}))
    monkeypatch.setattr(cont, "PACKAGED_CONTINUATIONS", ship)
    cont.shipped_continuations.cache_clear()
    decoded, real = [], cont.greedy_decode
    monkeypatch.setattr(cont, "greedy_decode", lambda bundle, i, n: decoded.append(list(i)) or real(bundle, i, n))
    got = cont.get_continuations(b, ps, 12, prompt_ids=ids, progress=False)
    assert decoded == [ids[1]]  # only the prompt with no shipped continuation
    assert [c.generated for c in got] == [c.generated for c in exact]
    assert (tmp_path / "cache" / "continuations" / b.slug / "12" / f"{cont._cache_key(ids[0])}.json").exists()

    def lookup(key):
        cont.shipped_continuations.cache_clear()
        return cont.shipped_continuations(*key.split("/")) or None

    damaged = tmp_path / "damaged"
    damaged.mkdir()
    assert_damaged_shipped_file_ignored(monkeypatch, cont, "PACKAGED_CONTINUATIONS", lookup, f"{b.slug}/12",
                                        "tiny.json", damaged)
    cont.shipped_continuations.cache_clear()


def test_default_splits_are_disjoint():
    from lede_env.prompts import DATASTORE_EXTRA, DEFAULT_CALIB, DEFAULT_EVAL, DEFAULT_TRAIN, WIDE_EVAL, load_prompts
    from lede_env.prompts import check_disjoint

    check_disjoint(calibration=DEFAULT_CALIB, training=DEFAULT_TRAIN, evaluation=DEFAULT_EVAL, datastore=DATASTORE_EXTRA)
    check_disjoint(calibration=DEFAULT_CALIB, training=DEFAULT_TRAIN, wide_evaluation=WIDE_EVAL,
                   datastore=DATASTORE_EXTRA)
    assert len(load_prompts(DATASTORE_EXTRA)) == 879
    cats = {p.category for p in load_prompts(DEFAULT_CALIB)}
    assert {"code", "instructions", "math_word_problems", "translation"} <= cats
    assert not cats & {"writing", "roleplay", "math"}  # held-out categories the heads never saw
    # evaluation rows for the context-heavy categories too (where context drafts pay)
    assert {"summarization", "passage_qa", "code_editing"} <= {p.category for p in load_prompts(DEFAULT_EVAL)}
    with pytest.raises(ValueError, match="both the calibration and the held_out"):
        check_disjoint(calibration="humaneval[0:10]", held_out="humaneval[5:8]")

