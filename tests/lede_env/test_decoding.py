"""The decoder is lossless: its tokens equal greedy decoding for every action sequence; its round
counters agree with the tokens it returns, however a generation ends (EOS, a stopping criterion,
a stop callback or string, the length cap)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lede_env.decoding import Sampling, SelfSpeculativeDecoder, SequencePolicy, StaticPolicy, greedy_reference
from lede_env.exits import HEAD_KINDS, ExitHeads
from lede_env.kernels import available

from ..conftest import chat_input_ids as _chat, decode_cases, make_tiny

MODELS = {}


def random_calibrated_stop(n_exits: int, k_max: int, data):
    """A CalibratedStop with hypothesis-drawn acceptance tables and thresholds (any values: the
    output must stay greedy's whatever the rule decides)."""
    import numpy as np

    from lede_env.stopping import DEFAULT_EDGES, AcceptanceCalibration, CalibratedStop

    B = len(DEFAULT_EDGES) - 1
    rate = np.sort(np.array(data.draw(st.lists(st.floats(0, 1), min_size=n_exits * B, max_size=n_exits * B)),
                            np.float32).reshape(n_exits, B), axis=1)
    cal = AcceptanceCalibration(np.array(DEFAULT_EDGES, np.float32), rate, rate.mean(1), np.ones_like(rate))
    th = np.array(data.draw(st.lists(st.floats(0, 1.2), min_size=n_exits * k_max, max_size=n_exits * k_max)),
                  np.float64).reshape(n_exits, k_max)
    return CalibratedStop(cal, th)


def model(num_layers, seed):
    key = (num_layers, seed)
    if key not in MODELS:
        MODELS[key] = make_tiny(num_layers=num_layers, seed=seed)
    return MODELS[key]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(**decode_cases(max_new=24))
def test_output_equals_greedy_for_every_action_sequence(num_layers, seed, prompt, actions, k_max, bonus, reuse,
                                                        max_new, data):
    b = model(num_layers, seed)
    L = b.stack.num_layers
    exits = data.draw(st.lists(st.integers(1, L - 1), min_size=1, max_size=L - 1, unique=True).map(sorted))
    heads = ExitHeads(b.stack, exits, data.draw(st.sampled_from(HEAD_KINDS)))  # every head kind
    if heads.translated:  # translators that are not the identity, as fitted ones are not
        g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
        heads.weight += 0.3 * torch.randn(heads.weight.shape, generator=g)
    dec = SelfSpeculativeDecoder(b.stack, heads, k_max, b.eos_ids, bonus, reuse=reuse)
    acts = [a % dec.actions.n for a in actions]
    ids = torch.tensor(prompt)
    ref = greedy_reference(b.model, ids, max_new, b.eos_ids)
    kernel = data.draw(st.sampled_from(("auto",) + available(b.stack.device, b.stack.dtype)))  # every kernel
    b.stack.set_kernels(kernel)
    try:
        _check_generation(dec, ids, policy_for(acts, len(exits), k_max, data), max_new, ref)
    finally:
        b.stack.set_kernels("auto")


def policy_for(acts, n_exits, k_max, data):
    policy = SequencePolicy(acts)
    stop = data.draw(st.sampled_from(["none", "threshold", "calibrated"]))
    if stop == "threshold":  # confidence-threshold drafting
        policy.stop_threshold = data.draw(st.floats(0.01, 0.99))
    elif stop == "calibrated":  # calibrated in-round stopping, with arbitrary tables and thresholds
        policy.stop_rule = random_calibrated_stop(n_exits, k_max, data)
    return policy


def _check_generation(dec, ids, policy, max_new, ref):
    out = dec.generate(ids, policy, max_new)
    assert out.tokens == ref
    assert len(out.tokens) <= max_new
    assert sum(r.emitted for r in out.rounds) + 1 == len(out.tokens)
    assert all(r.draft_len <= dec.actions.decode(r.action)[1] for r in out.rounds)


def test_rounds_accept_and_reject():
    """The tiny model drafts both accepted and rejected tokens (so the law above is not vacuous)."""
    b = model(4, 0)
    heads = ExitHeads(b.stack, (1, 2, 3))
    dec = SelfSpeculativeDecoder(b.stack, heads, 4, b.eos_ids)
    out = dec.generate(torch.tensor([5, 6, 7, 8]), StaticPolicy(dec.actions.encode(3, 4)), 32)
    assert 0 < out.accepted < out.drafted


def test_cache_is_cropped_to_the_accepted_prefix():
    """After a rejected draft, continuing equals never having drafted: the cache holds exactly
    the accepted positions, in every layer."""
    b = model(4, 0)
    heads = ExitHeads(b.stack, (1, 2, 3))
    dec = SelfSpeculativeDecoder(b.stack, heads, 4, b.eos_ids)
    lengths = []
    orig = b.stack.crop

    def spy(cache, length):
        orig(cache, length)
        lengths.append({layer.get_seq_length() for layer in cache.layers})

    b.stack.crop = spy
    try:
        out = dec.generate(torch.tensor([5, 6, 7]), StaticPolicy(dec.actions.encode(1, 4)), 20)
    finally:
        del b.stack.crop
    assert all(len(s) == 1 for s in lengths)  # every layer holds the same number of positions
    expected, pos = [], 3
    for r in out.rounds:
        pos += r.emitted
        expected.append(pos)
    assert [s.pop() for s in lengths][: len(expected) - 1] == expected[:-1]


def test_bad_inputs_are_refused():
    b = model(4, 0)
    heads = ExitHeads(b.stack, (1, 2, 3))
    dec = SelfSpeculativeDecoder(b.stack, heads, 4, b.eos_ids)
    with pytest.raises(ValueError, match="Batch size"):
        dec.generate(torch.tensor([[1, 2], [3, 4]]), StaticPolicy(0), 4)
    with pytest.raises(ValueError, match="empty"):
        dec.generate(torch.tensor([], dtype=torch.long), StaticPolicy(0), 4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        dec.generate(torch.tensor([3]), StaticPolicy(0), 0)
    with pytest.raises(ValueError, match="context"):
        dec.generate(torch.tensor([3] * 500), StaticPolicy(0), 100)
    with pytest.raises(ValueError, match="outside"):
        dec.generate(torch.tensor([3, 4]), StaticPolicy(dec.actions.n), 4)
    with pytest.raises(ValueError, match="outside 1..3"):
        ExitHeads(b.stack, (0, 2))
    with pytest.raises(ValueError, match="duplicates"):
        ExitHeads(b.stack, (2, 2))


@pytest.mark.parametrize("kind", ["compact", "full"])
def test_interleaved_generations_on_one_decoder_equal_separate_ones(kind):
    """The observation history is each generation's own (its DecodeState's): two generations
    played round by round in turn on one decoder, with a policy that reads the history and the
    running per-exit acceptance, see the observations, choose the actions and emit the tokens
    that each sees and emits alone, and both equal greedy decoding."""
    from lede_env.mdp import ObservationConfig

    b = make_tiny()
    dec = SelfSpeculativeDecoder(b.stack, ExitHeads(b.stack, (1, 2, 3), "lens"), 4, b.eos_ids,
                                 obs_config=ObservationConfig(kind=kind, history=3), context_draft=3)
    prompts = [torch.tensor([1, 5, 9, 2, 7]), torch.tensor([3, 3, 8, 1])]

    def choose(obs) -> int:  # an action that depends on everything the generation has seen
        seen = float(obs["history"].sum()) + float(obs.get("experience", obs["history"]).sum())
        return int(seen * 1000) % dec.actions.n

    def drive(states) -> list[list[tuple]]:
        logs = [[] for _ in states]
        while not all(s.done for s in states):
            for s, log in zip(states, logs):
                if not s.done:
                    obs = dec.observe(s)
                    a = choose(obs)
                    dec.play_round(s, a)
                    log.append((a, dec.observer.flatten(obs).tolist()))
        return logs

    with torch.no_grad():
        alone = [drive([dec.start(p, 24)])[0] for p in prompts]
        states = [dec.start(p, 24) for p in prompts]
        together = drive(states)
        alone_tokens = []
        for p in prompts:
            s = dec.start(p, 24)
            drive([s])
            alone_tokens.append(s.result.tokens)
    assert together == alone
    assert len({a for log in alone for a, _ in log}) > 2  # the policy did read what it saw
    for p, s, toks in zip(prompts, states, alone_tokens):
        assert s.result.tokens == toks == greedy_reference(b.model, p, 24, b.eos_ids)


def test_an_envs_decoder_plays_the_envs_round_rules_and_is_never_changed(tiny):
    """Trace replay and the decoder play one frozen RoundRules object: the env's decoder holds the
    env's rules (the stop rule in force resolved), and its settings cannot be edited afterwards."""
    from dataclasses import replace

    from lede_env.env import LEDEEnv

    b, heads, ts, prof = tiny
    env = LEDEEnv.with_objects(trace_set=ts, heads=heads, profile=prof, eos_ids=b.eos_ids, k_max=4, context_draft=3,
                               context_lengths=(2,), stop_threshold=0.4, progress=False)
    dec = env.make_decoder(bundle=b)
    assert dec.rules == replace(env.rules, stop_rule=env.rules.stop)
    assert (dec.context_draft, dec.copy_max, dec.actions, dec.profile) == (3, 3, env.actions, prof)
    for name in ("context_draft", "datastore", "stop_rule", "actions"):
        with pytest.raises(AttributeError):
            setattr(dec, name, None)
    with pytest.raises(ValueError, match="not the heads'"):
        SelfSpeculativeDecoder.from_rules(b.stack, ExitHeads(b.stack, (1, 2), "lens"), env.rules)


def test_a_round_reads_on_one_screen():
    """propose -> verify -> accept -> crop: the round's core is one function of at most 45 code
    lines (docstring and comments not counted), every draft source behind one interface."""
    import ast
    import inspect
    import textwrap

    from lede_env.decoding import CopyDraft, Drafter, ExitDraft

    fn = ast.parse(textwrap.dedent(inspect.getsource(SelfSpeculativeDecoder.play_round))).body[0]
    body = fn.body[1:] if isinstance(fn.body[0], ast.Expr) else fn.body  # the docstring left out
    lines = {n.lineno for stmt in body for n in ast.walk(stmt) if hasattr(n, "lineno")}
    assert len(lines) <= 45, len(lines)
    assert issubclass(ExitDraft, Drafter) and issubclass(CopyDraft, Drafter)


# ---- round counters after every way a generation ends ------------------------------------
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
    the tokens returned (a case users met: 4 drafted, 2 kept -> accepted 2, emitted 2)."""
    b = model(num_layers, seed)
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

