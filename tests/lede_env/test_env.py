"""LEDE-Llama3-v0 on a tiny model: API, exact replay of the live decoder, rewards, the oracle; the
truncation warning only when a continuation was cut by its length limit."""

from __future__ import annotations

import warnings
from dataclasses import replace

import numpy as np
import torch
import pytest
from gymnasium.utils.env_checker import check_env
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from lede_env.datastore import NgramDatastore
from lede_env.env import LEDEEnv
from lede_env.mdp import ActionMap
from lede_env.replay import oracle_plan, rollout

from ..conftest import random_rollout, replay_live


def test_check_env(tiny_env):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        check_env(tiny_env, skip_render_check=True)
    unexpected = [str(x.message) for x in w if "infinity" not in str(x.message) and "spec" not in str(x.message)]
    assert unexpected == []


def test_action_map_round_trip():
    A = ActionMap((2, 4, 6), 5)
    assert A.n == 16
    assert A.decode(0) == (0, 0)
    assert A.decode(1) == (2, 1)
    assert A.decode(15) == (6, 5)
    for a in range(A.n):
        assert A.encode(*A.decode(a)) == a
    with pytest.raises(ValueError, match="outside"):
        A.decode(16)
    with pytest.raises(TypeError):
        A.decode(1.5)
    with pytest.raises(ValueError):
        A.encode(3, 1)
    with pytest.raises(ValueError):
        ActionMap((2,), 0)


def test_action_map_with_context_lengths():
    A = ActionMap((2, 4), 3, (1, 2, 4))
    assert A.n == 1 + 3 + 2 * 3 and A.first_exit_action == 4 and A.max_copy == 4
    assert [A.decode(a) for a in range(A.n)] == [(0, 0), (0, 1), (0, 2), (0, 4), (2, 1), (2, 2), (2, 3), (4, 1),
                                                 (4, 2), (4, 3)]
    for a in range(A.n):
        assert A.encode(*A.decode(a)) == a
    with pytest.raises(ValueError, match="Context-draft length 3"):
        A.encode(0, 3)
    for bad in ((2, 1), (0, 1), (1, 1), (1, 65), (True,)):
        with pytest.raises(ValueError, match="context_lengths"):
            ActionMap((2,), 3, bad)
    assert ActionMap((2,), 3).max_copy == 0


def test_step_before_reset_and_after_end(tiny_env):
    with pytest.raises(RuntimeError, match="reset"):
        tiny_env.step(0)
    tiny_env.reset(seed=0)
    done = False
    while not done:
        _, _, te, tr, _ = tiny_env.step(0)
        done = te or tr
    with pytest.raises(RuntimeError, match="reset"):
        tiny_env.step(0)


def test_same_seed_same_rollout(tiny):
    b, heads, ts, prof = tiny

    def roll(seed):
        env = LEDEEnv.with_objects(trace_set=ts, profile=prof, eos_ids=b.eos_ids, k_max=4, max_new_tokens=32)
        env.action_space.seed(seed)
        obs, info = env.reset(seed=seed)
        out = [info["prompt_id"]]
        done = False
        while not done:
            obs, r, te, tr, _ = env.step(env.action_space.sample())
            out.append((r, obs["hidden"].tobytes()))
            done = te or tr
        return out

    assert roll(3) == roll(3)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                               HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 10_000), bonus=st.booleans(), reuse=st.booleans(), max_new=st.integers(2, 32),
       stop=st.one_of(st.none(), st.floats(0.02, 0.98)), ctx=st.sampled_from([0, 1, 4]),
       lengths=st.sampled_from([(), (1, 3), (2, 5, 8)]),
       obs=st.sampled_from([("full", 1, False), ("compact", 1, True), ("compact", 0, False), ("compact", 0, True)]),
       store=st.booleans(), trees=st.sampled_from([(), (), (2,), (3, 6)]), depth=st.integers(1, 5))
@example(seed=1682, bonus=False, reuse=False, max_new=10, stop=0.03125, ctx=0, lengths=(),  # found by hypothesis:
         obs=("full", 1, False), store=False, trees=(), depth=8)
def test_trace_env_replays_the_live_decoder_exactly(tiny, seed, bonus, reuse, max_new, stop, ctx, lengths, obs,
                                                    store, trees, depth):
    """Tokens, accepted counts, costs, rewards and observations of the trace env equal those of
    the real decoder for the same actions, with and without context drafts on action 0 and
    context actions, with and without a datastore drafting where the context has no match, for the
    full and compact observations (with and without head statistics, with
    and without the context matches' agreement features), with and without token-tree actions
    (:mod:`lede_env.trees`: the same tree, the same accepted branch); with
    confidence-threshold drafting the drafted counts, costs and observations are compared up to
    the first round that rejects a draft token."""
    b, heads, ts, prof = tiny
    datastore = (NgramDatastore([t.generated.tolist() for t in ts.traces], ngram=(1, 2), min_count=1)
                 if store and (ctx or lengths or trees) else None)
    env = LEDEEnv.with_objects(trace_set=ts, profile=prof, eos_ids=b.eos_ids, k_max=4, max_new_tokens=max_new, bonus=bonus,
                  reuse=reuse, stop_threshold=stop, context_draft=ctx, context_lengths=lengths, obs_kind=obs[0],
                  obs_stat_exits=obs[1], obs_context_agreement=obs[2], datastore=datastore, tree_budgets=trees,
                  tree_depth=depth)
    acts, infos, observations, rewards = random_rollout(env, seed)
    rounds, info = [i["round"] for i in infos], infos[-1]
    for r, rd in zip(rewards, rounds):
        assert r == pytest.approx(rd["emitted"] - env.reward_lambda * rd["cost"])
    res, seen = replay_live(env, b, heads, acts)
    assert res.tokens == env.trace.generated[: len(res.tokens)].tolist()
    assert len(res.tokens) == info["tokens_generated"]
    live = [(x.exit_layer, x.accepted, x.emitted) for x in res.rounds]
    assert live == [(x["exit_layer"], x["accepted"], x["emitted"]) for x in rounds]
    # With a stop threshold, a round that rejects a draft token drafts on from a wrong prefix whose
    # probabilities the trace does not hold: its drafted count (and cost) is exact only in
    # rounds without a rejection (found by hypothesis: stop=0.078 drafted 4 live, 3 replayed).
    exact = [stop is None or x["accepted"] == x["draft_len"] for x in rounds]
    assert [x.draft_len for x, e in zip(res.rounds, exact) if e] == [x["draft_len"] for x, e in zip(rounds, exact) if e]
    assert [x.cost for x, e in zip(res.rounds, exact) if e] == pytest.approx([x["cost"] for x, e in zip(rounds, exact)
                                                                              if e])
    # observations record K in their round history: exact up to the first inexact round
    upto = exact.index(False) + 1 if False in exact else len(observations)
    for o_live, o_env in list(zip(seen, observations))[:upto]:
        for k in o_env:
            np.testing.assert_allclose(o_live[k], o_env[k], rtol=1e-4, atol=1e-4)



@pytest.mark.parametrize("rule", [False, True])
def test_trace_env_replays_the_live_decoder_on_tree_actions(tiny, rule):
    """Every round a tree action (budgets 2, 4 and 8 in turn; with the static tree rule pruning
    them, played through a policy as the decoder plays it): the trace env and the real decoder
    emit the same tokens with the same accepted branches, verified nodes and costs, on every
    playable trace."""
    from lede_env.policies import SequencePolicy, TreeRulePolicy, own_tree_prune
    from lede_env.trees import TreePrune

    b, heads, ts, prof = tiny
    store = NgramDatastore([t.generated.tolist() for t in ts.traces], ngram=(1, 2), min_count=1)
    env = LEDEEnv.with_objects(trace_set=ts, profile=prof, eos_ids=b.eos_ids, k_max=4, max_new_tokens=24,
                               context_lengths=(2, 4), tree_budgets=(2, 4, 8), tree_depth=4, datastore=store)
    trees = [env.actions.encode_tree(x) for x in (2, 4, 8)]
    prune = TreePrune.from_profile(prof, 8, 1.5) if rule else None
    dec = env.make_decoder(b, heads)
    tree_rounds = 0
    for idx in env.playable:
        acts = [trees[i % 3] for i in range(24)]
        with env.playing(TreeRulePolicy(env.actions, 8, prune) if rule else SequencePolicy(acts)):
            env.reset(options={"prompt_index": idx})
            rounds, done = [], False
            while not done:
                _, _, te, tr, info = env.step(acts[len(rounds)])
                rounds.append(info["round"])
                done = te or tr
        policy = SequencePolicy(acts[: len(rounds)])
        if rule:
            policy.tree_prune = prune
            assert own_tree_prune(policy) is prune
        res = dec.generate(torch.tensor([env.trace.prompt.tolist()]), policy, max_new_tokens=24)
        assert res.tokens == env.trace.generated[: len(res.tokens)].tolist()
        assert [(x.accepted, x.emitted, x.draft_len, x.n_verify) for x in res.rounds] == \
            [(x["accepted"], x["emitted"], x["draft_len"], x["n_verify"]) for x in rounds]
        assert [x.cost for x in res.rounds] == pytest.approx([x["cost"] for x in rounds])
        tree_rounds += sum(x.tree for x in res.rounds)
    assert tree_rounds > 0

def test_rewards(tiny):
    b, heads, ts, prof = tiny
    for mode in ("net", "ratio"):
        env = LEDEEnv.with_objects(trace_set=ts, profile=prof, eos_ids=b.eos_ids, k_max=4, max_new_tokens=32, reward_mode=mode)
        env.reset(seed=0, options={"prompt_index": 0})
        _, r, *_ = env.step(0)
        ar_cost = 1.0 + prof.overhead / prof.ar_step
        assert r == pytest.approx(1 - ar_cost if mode == "net" else 1 / ar_cost)
    # net: the undiscounted return is tokens - total cost
    env = LEDEEnv.with_objects(trace_set=ts, profile=prof, eos_ids=b.eos_ids, k_max=4, max_new_tokens=32, reward_mode="net")
    env.reset(seed=1, options={"prompt_index": 1})
    ret = tok = cost = 0.0
    done = False
    while not done:
        _, r, te, tr, info = env.step(env.actions.encode(2, 3))
        ret += r
        tok += info["round"]["emitted"]
        cost += info["round"]["cost"]
        done = te or tr
    assert ret == pytest.approx(tok - cost)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), lam=st.one_of(st.just("auto"), st.floats(0.5, 3.0)))
def test_relative_return_is_tokens_minus_lambda_cost(tiny, seed, lam):
    """The default reward: for any action sequence, the undiscounted return is N - lambda * total
    cost (N tokens emitted by the rounds); lambda 'auto' is the best static throughput on the
    env's traces (whole K drafted, no overhead), and at least AR's 1.0."""
    from lede_env.replay import best_static, useful_actions
    from lede_env.stopping import NO_STOP

    b, heads, ts, prof = tiny
    env = LEDEEnv.with_objects(trace_set=ts, profile=prof, eos_ids=b.eos_ids, k_max=4, max_new_tokens=24, reward_lambda=lam)
    assert env.reward_mode == "relative"
    if lam == "auto":
        rules = replace(env.rules.without_overhead(), stop_rule=NO_STOP)
        best = best_static([ts.traces[i] for i in env.playable], rules, 24)[1]
        assert env.reward_lambda == pytest.approx(max(1.0, best))
        assert set(useful_actions(rules)) >= {0}
    else:
        assert env.reward_lambda == lam
    env.action_space.seed(seed)
    env.reset(seed=seed)
    ret = tok = cost = 0.0
    done = False
    while not done:
        _, r, te, tr, info = env.step(int(env.action_space.sample()))
        ret += r
        tok += info["round"]["emitted"]
        cost += info["round"]["cost"]
        done = te or tr
    assert ret == pytest.approx(tok - env.reward_lambda * cost)


def test_episode_end(tiny):
    b, heads, ts, prof = tiny
    env = LEDEEnv.with_objects(trace_set=ts, profile=prof, eos_ids=b.eos_ids, k_max=4, max_new_tokens=7)
    for i in env.playable:
        env.reset(seed=0, options={"prompt_index": i})
        done = False
        while not done:
            _, _, te, tr, info = env.step(env.actions.encode(3, 4))
            done = te or tr
        t = env.trace
        assert info["tokens_generated"] <= 7
        if te:
            assert t.eos and info["tokens_generated"] == t.n
        else:
            assert info["tokens_generated"] == min(7, t.n)


def test_oracle_beats_every_static_policy(tiny_env):
    u = tiny_env
    for t in u.trace_set.traces:
        plan, ctg = oracle_plan(t, u.rules, u.max_new_tokens)
        best = rollout(t, u.rules, u.max_new_tokens, lambda g: int(plan[g]))
        if best["rounds"] == 0:
            continue
        assert best["cost"] == pytest.approx(ctg[1])
        for a in range(u.actions.n):
            other = rollout(t, u.rules, u.max_new_tokens, lambda g, a=a: a)
            assert other["tokens"] == best["tokens"]
            assert best["cost"] <= other["cost"] + 1e-9


def test_episode_loop_matches_rollout(tiny_env):
    """The gym episode loop (play_episode) and the trace-only rollout agree round for round."""
    from lede_env.episodes import play_episode
    from lede_env.policies import StaticPolicy

    u = tiny_env
    rules = u.rules.without_overhead()
    for i in u.playable:
        t = u.trace_set.traces[i]
        plan = oracle_plan(t, rules, u.max_new_tokens)[0]  # the env's oracle when no overhead is charged
        for a in (None, 0, u.actions.n - 1):  # the oracle, AR, the longest draft
            pol = None if a is None else StaticPolicy(a)
            with u.playing(pol):
                ep = play_episode(u, pol, seed=0, options={"prompt_index": i})
            ref = rollout(t, rules, u.max_new_tokens, (lambda g: int(plan[g])) if a is None else (lambda g, a=a: a))
            tot = ep.totals
            assert (tot.tokens, tot.rounds, tot.accepted, tot.drafted) == \
                (ref["tokens"], ref["rounds"], ref["accepted"], ref["drafted"])
            assert tot.cost == pytest.approx(ref["cost"])
            assert len(ep.observations) == len(ep.actions) + 1 == len(ep.step_infos) + 1
            assert ep.ret == pytest.approx(sum(ep.rewards))
            assert ep.reset_info["prompt_index"] == i and (ep.terminations[-1] or ep.truncations[-1])


def test_bad_arguments(tiny):
    b, heads, ts, prof = tiny
    with pytest.raises(ValueError, match="reward_mode"):
        LEDEEnv.with_objects(trace_set=ts, profile=prof, eos_ids=b.eos_ids, k_max=4, reward_mode="sum")
    with pytest.raises(ValueError, match="k_max"):
        LEDEEnv.with_objects(trace_set=ts, profile=prof, eos_ids=b.eos_ids, k_max=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        LEDEEnv.with_objects(trace_set=ts, profile=prof, eos_ids=b.eos_ids, max_new_tokens=1)
    env = LEDEEnv.with_objects(trace_set=ts, profile=prof, eos_ids=b.eos_ids, k_max=4)
    env.reset(seed=0)
    with pytest.raises(ValueError, match="outside"):
        env.step(env.action_space.n)
    with pytest.raises(TypeError):
        env.step("1")
    with pytest.raises(ValueError, match="prompt_index"):
        env.reset(options={"prompt_index": 99})


@pytest.fixture(scope="module")
def tiny_prev(tiny):
    """The tiny model with ``"affine-kl-prev"`` heads and its traces under them. The tiny
    model's greedy text loops, so fitted heads agree almost everywhere and a first-token head
    would change few outcomes: the translators are fitted, the first-token ones drawn at random
    (seeded), so that a round's first draft token is accepted where a later token's would not be
    and the other way round (losslessness does not depend on the heads' quality)."""
    import torch

    from lede_env.exits import ExitHeads, fit_affine
    from lede_env.traces import build_traces

    from ..conftest import tiny_continuations

    b, _, _, prof = tiny
    conts = tiny_continuations(b)
    seqs = [(torch.tensor(c.prompt_ids + c.generated), len(c.prompt_ids)) for c in conts]
    heads = ExitHeads(b.stack, (1, 2, 3), "affine-kl-prev")
    fit_affine(heads, seqs)
    g = torch.Generator().manual_seed(0)
    heads.first_weight = torch.randn(heads.first_weight.shape, generator=g) / b.stack.hidden_size ** 0.5
    heads.first_bias = torch.randn(heads.first_bias.shape, generator=g)
    return b, heads, build_traces(b, heads, conts, progress=False), prof


def test_first_token_drafts_differ_from_the_later_tokens_head(tiny_prev):
    """The traces of ``"affine-kl-prev"`` heads hold a first-token draft column, not a copy of
    the later tokens' one (else the replay law below would not test it)."""
    ts = tiny_prev[2]
    assert all(t.draft_first is not None for t in ts.traces)
    # positions where a first draft token is accepted and a later one would not be, or the reverse
    differ = sum(int(((t.draft_first == t.generated[:, None]) != (t.draft == t.generated[:, None])).sum())
                 for t in ts.traces)
    assert differ >= 20


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                               HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 10_000), bonus=st.booleans(), reuse=st.booleans(), max_new=st.integers(2, 32),
       stop=st.one_of(st.none(), st.floats(0.02, 0.98)))
def test_trace_env_replays_the_live_decoder_with_first_token_heads(tiny_prev, seed, bonus, reuse, max_new, stop):
    """With ``"affine-kl-prev"`` heads (a round's first draft token from its own head, which reads
    the previous position's final hidden state), the trace env's tokens, accepted and emitted
    counts equal the real decoder's for the same actions, and its tokens are greedy decoding's;
    with a stop threshold drafted counts and costs are compared in rounds without a rejection (as
    in the law above)."""
    b, heads, ts, prof = tiny_prev
    env = LEDEEnv.with_objects(trace_set=ts, profile=prof, eos_ids=b.eos_ids, k_max=4, max_new_tokens=max_new, bonus=bonus,
                  reuse=reuse, stop_threshold=stop)
    acts, infos, _, _ = random_rollout(env, seed)
    rounds = [i["round"] for i in infos]
    res, _ = replay_live(env, b, heads, acts)
    assert res.tokens == env.trace.generated[: len(res.tokens)].tolist()
    assert len(res.tokens) == infos[-1]["tokens_generated"]
    assert [(x.exit_layer, x.accepted, x.emitted) for x in res.rounds] == \
        [(x["exit_layer"], x["accepted"], x["emitted"]) for x in rounds]
    exact = [stop is None or x["accepted"] == x["draft_len"] for x in rounds]
    assert [x.draft_len for x, e in zip(res.rounds, exact) if e] == [x["draft_len"] for x, e in zip(rounds, exact) if e]


def test_first_token_columns_survive_a_trace_file_round_trip(tiny_prev, tiny, tmp_path):
    """Traces of ``"affine-kl-prev"`` heads keep their first-token columns through
    save_traces/load_traces; traces of other heads are saved without them and load as ``None``."""
    from lede_env.traces import load_traces, save_traces

    ts = tiny_prev[2]
    save_traces(ts, tmp_path / "prev")
    back = load_traces(tmp_path / "prev")
    for a, b_ in zip(ts.traces, back.traces):
        assert np.array_equal(a.draft_first, b_.draft_first) and np.array_equal(a.draft_first_prob, b_.draft_first_prob)
    save_traces(tiny[2], tmp_path / "lens")
    assert all(t.draft_first is None for t in load_traces(tmp_path / "lens").traces)


# ---- the truncation warning ----------------------------------------------------------------
def _trace_set(cut_one: bool):
    """A trace set of the tiny model whose continuations all end with EOS within 32 tokens
    (EOS = one token each of them generates), or, with ``cut_one``, one stopped at 12 tokens
    without EOS."""
    import torch

    from lede_env.decoding import greedy_reference
    from lede_env.exits import ExitHeads
    from lede_env.continuations import Continuation
    from lede_env.traces import build_traces

    from ..conftest import make_tiny, tiny_continuations

    b = make_tiny(num_layers=4, seed=0)
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
    """A case users met: every continuation ends with EOS well within the requested 64 tokens, so
    no episode is truncated (the manifest's max_new_tokens is only the longest continuation)."""
    assert _env_warnings(cut_one=False) == []


# ---- the compact observation ---------------------------------------------------------------
def test_compact_observation_carries_running_acceptance(tiny):
    b, heads, ts, prof = tiny
    env = LEDEEnv.with_objects(trace_set=ts, profile=prof, eos_ids=b.eos_ids, k_max=4, max_new_tokens=32, obs_kind="compact")
    obs, _ = env.reset(seed=0, options={"prompt_index": 0})
    assert env.observation_space.contains(obs)
    assert obs["experience"][:, 0] == pytest.approx(0.3) and not obs["experience"][:, 1].any()  # the prior
    obs, _, _, _, info = env.step(env.actions.encode(2, 3))
    rd = info["round"]
    judged = rd["accepted"] + (rd["accepted"] < rd["draft_len"])
    w = 0.8 ** judged
    assert obs["experience"][1, 0] == pytest.approx(w * 0.3 + (1 - w) * rd["accepted"] / judged)
    assert obs["experience"][1, 1] == pytest.approx(judged / (judged + 8))
    assert obs["experience"][0, 0] == pytest.approx(0.3)  # exits not used keep their prior
    assert env.observer.flat_dim == 3 + 3 * 2 + 4 * 4 + 1

