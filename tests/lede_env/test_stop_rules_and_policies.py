"""Stop rules and the policies built on them: the exit heads' acceptance calibration and the
calibrated in-round stop rule (also in the heads' file key), the drop rule, a policy's own stop
rule read in one place; the actions that can pay, the safety net (guards), the copy-else policy;
the heads' agreement by category."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lede_env.costs import CostProfile
from lede_env.decoding import SelfSpeculativeDecoder, StaticPolicy, greedy_reference
from lede_env.env import LEDEEnv
from lede_env.exits import ExitHeads, calibrate_acceptance
from lede_env.policies import BasePolicy, GuardedPolicy
from lede_env.replay import useful_actions
from lede_env.rules import RoundRules
from lede_env.stopping import AcceptanceCalibration, CalibratedStop, ThresholdStop

from ..conftest import assert_damaged_shipped_file_ignored, random_rollout, replay_live, tiny_continuations


@pytest.fixture(scope="module")
def calibrated_heads(tiny):
    """Lens heads of the tiny model (the traces' drafts) with an acceptance calibration fitted
    on continuations the traces do not contain."""
    b, _, _, _ = tiny
    heads = ExitHeads(b.stack, (1, 2, 3), "lens")
    seqs = [(torch.tensor(c.prompt_ids + c.generated), len(c.prompt_ids)) for c in tiny_continuations(b, 8, seed=1)]
    calibrate_acceptance(heads, seqs)
    return heads


# ---- the acceptance calibration and the calibrated rule --------------------------------------
def test_calibration_is_monotone_and_recovers_a_known_rate():
    rng = np.random.default_rng(0)
    p = rng.random((20000, 2))
    acc = rng.random((20000, 2)) < p  # acceptance probability = the draft probability itself
    cal = AcceptanceCalibration.fit(p, acc)
    assert np.all(np.diff(cal.rate, axis=1) >= 0)
    for q in (0.12, 0.45, 0.75, 0.96):
        assert cal(0, q) == pytest.approx(q, abs=0.06)  # a bin's mean probability, within a bin's width
    assert cal.mean == pytest.approx(acc.mean(0), abs=1e-6)
    back = AcceptanceCalibration.from_state(cal.state())
    assert np.array_equal(back.rate, cal.rate) and np.array_equal(back.edges, cal.edges)


def test_calibrated_thresholds_follow_the_cost_profile():
    """Keep draft token j+1 only while P_{j+1} (all of the first j+1 accepted, calibrated) exceeds
    lambda x (cost of the round keeping j+1 tokens - keeping j, the candidate's pass spent in both)."""
    prof = CostProfile(num_layers=4, layer=[1.0, 1.1, 1.3, 1.6, 2.0], head=[1.0, 1.1, 1.2, 1.4, 1.6],
                       draft_head=0.1)
    edges = np.array([0.0, 0.5, 1.0], np.float32)
    cal = AcceptanceCalibration(edges, np.array([[0.2, 0.8]], np.float32), np.array([0.5], np.float32),
                                np.ones((1, 2), np.float32))
    rule = CalibratedStop.from_profile(cal, prof, (2,), 3, lam=1.2)
    for j in (0, 1, 2):
        n = lambda k: k + 1  # noqa: E731 - bonus: k drafts verify k + 1 positions
        dc = prof.round_cost(2, j + 1, n(j + 1), passes=j + 1) - prof.round_cost(2, j, n(j), passes=j + 1)
        assert rule.thresholds[0, j] == pytest.approx(1.2 * dc)
    # keeping the first draft: the dropped round is an AR step plus one head; so theta_0 is
    # lambda x (the bonus pass + verifying a second position), in AR-step units
    ar = prof.ar_step
    extra = (2 * 1.0 + (4 - 2) * (1.1 - 1.0) + (1.1 - 1.0)) / ar
    assert rule.thresholds[0, 0] == pytest.approx(1.2 * extra)
    conf, weak = 0.9, 0.1  # calibrated 0.8 and 0.2
    assert rule.thresholds[0] == pytest.approx([0.552, 0.6, 0.672])  # the formula above, by hand
    assert rule.keep(0, [conf]) and not rule.keep(0, [weak])
    # three confident drafts: P = 0.8 > 0.552 and 0.64 > 0.6 are kept, 0.512 < 0.672 is dropped
    # after its pass (2 kept, 3 passes); a weak first draft is dropped at once (0 kept, 1 pass)
    assert rule.draft(0, [conf, conf, conf], 3) == (2, 3)
    assert rule.draft(0, [weak, conf], 3) == (0, 1)
    # the threshold rule keeps its old meaning: stop after the first token below it (kept)
    assert ThresholdStop(0.5).draft(0, [0.9, 0.4, 0.9], 3) == (2, 2)
    with pytest.raises(ValueError, match="lambda"):
        CalibratedStop.from_profile(cal, prof, (2,), 3, lam=0)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 10_000), max_new=st.integers(2, 32), lam=st.floats(0.3, 3.0))
def test_trace_env_replays_the_decoder_under_the_calibrated_rule(tiny, calibrated_heads, seed, max_new, lam):
    """Same actions: the trace env and the real decoder emit the same tokens and accept the same
    counts under the calibrated stop rule, and draft the same counts in rounds without a rejection
    (after one the decoder drafts from a wrong prefix the trace does not hold)."""
    b, _, ts, prof = tiny
    env = LEDEEnv.with_objects(trace_set=ts, profile=prof, eos_ids=b.eos_ids, k_max=4, max_new_tokens=max_new,
                  heads=calibrated_heads, stop_rule="calibrated", reward_lambda=lam, obs_kind="compact")
    assert isinstance(env.rules.stop, CalibratedStop) and env.rules.stop.lam == lam
    acts, infos, observations, _ = random_rollout(env, seed)
    rounds = [i["round"] for i in infos]
    res, seen = replay_live(env, b, calibrated_heads, acts)
    assert res.tokens == env.trace.generated[: len(res.tokens)].tolist()
    assert [(x.exit_layer, x.accepted, x.emitted) for x in res.rounds] == \
        [(x["exit_layer"], x["accepted"], x["emitted"]) for x in rounds]
    exact = [x["accepted"] == x["draft_len"] for x in rounds]
    assert [x.draft_len for x, e in zip(res.rounds, exact) if e] == [x["draft_len"] for x, e in zip(rounds, exact) if e]
    # the compact observation (running acceptance, shallow exit's stats) replays exactly up to the
    # first round whose drafted count the trace cannot know
    upto = exact.index(False) + 1 if False in exact else len(observations)
    for o_live, o_env in list(zip(seen, observations))[:upto]:
        assert set(o_env) == {"exit_stats", "experience", "history", "progress"}
        for k in o_env:
            np.testing.assert_allclose(o_live[k], o_env[k], rtol=1e-4, atol=1e-4)


def test_calibrated_rule_needs_a_calibration(tiny):
    b, heads, ts, prof = tiny
    with pytest.raises(ValueError, match="acceptance calibration"):
        LEDEEnv.with_objects(trace_set=ts, profile=prof, eos_ids=b.eos_ids, k_max=4, heads=heads, stop_rule="calibrated")
    with pytest.raises(ValueError, match="stop_rule"):
        LEDEEnv.with_objects(trace_set=ts, profile=prof, eos_ids=b.eos_ids, k_max=4, stop_rule="sometimes")


# ---- actions that can pay ---------------------------------------------------------------------
def test_useful_actions_drop_what_cannot_beat_ar(tiny):
    b, heads, ts, prof = tiny
    env = LEDEEnv.with_objects(trace_set=ts, profile=prof, eos_ids=b.eos_ids, k_max=4, max_new_tokens=32)
    rules: RoundRules = env.rules
    keep = useful_actions(rules)
    ar = prof.round_cost(0, 0, 1)
    for a in range(env.actions.n):
        E, K = env.actions.decode(a)
        pays = a == 0 or (K + 1) / prof.round_cost(E, K, K + 1) > 1 / ar
        assert (a in keep) == pays


# ---- the safety net ---------------------------------------------------------------------------
class DeepAndLong(BasePolicy):
    """Always the deepest exit with the longest draft."""

    def __init__(self, actions):
        self.a = actions.encode(actions.exit_layers[-1], actions.k_max)

    def act(self, obs):
        return self.a


def test_safety_net_falls_back_and_keeps_the_output(tiny):
    """A policy that always drafts deep and long costs more than AR on the tiny model (its
    drafts are rarely accepted and cost nearly a full pass each): the guard falls back to AR,
    is cheaper, and the output stays greedy's."""
    b, heads, ts, prof = tiny
    dec = SelfSpeculativeDecoder(b.stack, heads, 4, b.eos_ids, profile=prof)
    ids = torch.tensor([5, 6, 7, 8])
    ref = greedy_reference(b.model, ids, 48, b.eos_ids)
    raw = dec.generate(ids, DeepAndLong(dec.actions), 48)
    guard = GuardedPolicy(DeepAndLong(dec.actions), window=4, wait=4, clock="cost")
    out = dec.generate(ids, guard, 48)
    assert raw.tokens == ref and out.tokens == ref
    assert len(raw.tokens) / raw.cost < 1.0  # the unguarded policy is slower than AR here
    assert guard.fallback_rounds > 0
    assert out.cost < raw.cost
    with pytest.raises(ValueError):
        GuardedPolicy(StaticPolicy(0), window=0)
    with pytest.raises(ValueError, match="clock"):
        GuardedPolicy(StaticPolicy(0), clock="sundial")


def _rounds(guard, n, seconds, emitted=1, draft_len=1, cost=0.0):
    """Feed the guard n rounds of the given kind; return the actions it chose."""
    from lede_env.decoding import RoundRecord

    acts = []
    for _ in range(n):
        acts.append(guard.act(None))
        ar = acts[-1] == 0
        guard.update(RoundRecord(action=acts[-1], exit_layer=0 if ar else 2, draft_len=0 if ar else draft_len,
                                 accepted=0 if ar else emitted - 1, emitted=1 if ar else emitted,
                                 cost=cost if not ar else 1.0, seconds=1.0 if ar else seconds))
    return acts


def test_wall_clock_guard_probes_ar_then_judges_by_measured_time():
    """Base rounds of 2.5 s emitting 2 tokens (0.8 tokens per 1-s AR step) fall back after one
    window, once AR's time has been measured by probe rounds; 1.5-s rounds emitting 2 tokens
    (1.33) keep the base. The profile's cost (0.5 here, optimistic) is ignored in wall-clock mode."""
    slow = GuardedPolicy(StaticPolicy(7), window=4, wait=3, probe=2)
    acts = _rounds(slow, 4, seconds=2.5, emitted=2, cost=0.5)  # first window: no AR time known yet
    assert acts == [7] * 4
    assert _rounds(slow, 2, 2.5, 2, cost=0.5) == [0, 0]  # the probe
    acts = _rounds(slow, 1, 2.5, 2, cost=0.5)  # the held window is judged now: 10 tokens in 12.5 AR steps
    assert acts == [7] and _rounds(slow, 3, 2.5, 2, cost=0.5) == [0, 0, 0]  # waits 3 AR rounds
    assert slow.fallback_rounds == 5
    fast = GuardedPolicy(StaticPolicy(7), window=4, wait=3, probe=2)
    _rounds(fast, 4, 1.5, 2)
    assert _rounds(fast, 2, 1.5, 2) == [0, 0]  # probe
    assert _rounds(fast, 8, 1.5, 2) == [7] * 8 and fast.fallback_rounds == 2
    # cost mode: the same slow rounds judged by their (optimistic) profile cost keep the base
    by_cost = GuardedPolicy(StaticPolicy(7), window=4, wait=3, clock="cost")
    assert _rounds(by_cost, 12, 2.5, 2, cost=0.5) == [7] * 12


def test_guard_compares_with_what_action_0_achieves():
    """Where action 0 emits 3 tokens per second (context drafts), a base emitting 2 tokens per
    second falls back, although it beats 1 token per AR step."""
    from lede_env.decoding import RoundRecord

    g = GuardedPolicy(StaticPolicy(7), window=4, wait=2, probe=2)
    _rounds(g, 4, 1.0, 2)
    for _ in range(2):  # the probe: action 0 copies 2 tokens per round, all accepted
        assert g.act(None) == 0
        g.update(RoundRecord(action=0, exit_layer=0, draft_len=2, accepted=2, emitted=3, seconds=1.0))
    _rounds(g, 1, 1.0, 2)
    assert _rounds(g, 2, 1.0, 2) == [0, 0]


def test_guard_falls_back_to_its_fallback_action_and_compares_with_it():
    """With fallback=3 (say a context action), the guard probes and plays action 3, and only
    action 3's rounds are the reference (action 0's slow rounds are not)."""
    from lede_env.decoding import RoundRecord

    g = GuardedPolicy(StaticPolicy(7), window=4, wait=2, probe=2, fallback=3)
    for _ in range(3):  # slow AR rounds (1 token/s) are no reference for fallback 3
        g._ref.clear()
        g.update(RoundRecord(action=0, exit_layer=0, draft_len=0, accepted=0, emitted=1, seconds=1.0))
        assert not g._ref
    g._hist.clear()
    _rounds(g, 4, 1.0, 2)  # the base: 2 tokens/s; action 3 has not been measured: probe it
    for _ in range(2):
        assert g.act(None) == 3
        g.update(RoundRecord(action=3, exit_layer=0, draft_len=3, accepted=3, emitted=4, seconds=1.0))
    _rounds(g, 1, 1.0, 2)  # the window is judged: 2 tokens/s against action 3's 4
    assert _rounds(g, 2, 1.0, 2) == [3, 3]  # fall back to action 3


def test_guarded_policy_name():
    from lede_env.mdp import ActionMap
    from lede_env.policies import policy_from_name

    actions = ActionMap((2, 4), 4)
    p = policy_from_name("guarded:static:2,1", actions)
    assert isinstance(p, GuardedPolicy) and p.base.act(None) == actions.encode(2, 1)
    with pytest.raises(ValueError, match="guarded:NAME"):
        policy_from_name("guarded:nonsense", actions)


def test_drop_stop_drops_the_token_it_doubts():
    """DropStop ends the draft *before* a token below its threshold (ThresholdStop keeps it)."""
    from lede_env.stopping import DropStop

    rule = DropStop(0.5)
    assert rule.draft(0, [0.9, 0.2, 0.8], 3) == (1, 2)  # one kept, the second looked at and dropped
    assert rule.draft(0, [0.1], 1) == (0, 1)  # a dropped first token: a plain AR step
    assert rule.draft(0, [0.6, 0.7], 2) == (2, 2)
    with pytest.raises(ValueError, match="drop threshold"):
        DropStop(1.0)


def test_copy_else_draft_copies_where_it_can_and_drafts_one_token_elsewhere(tiny):
    """copy-else:M,E,THRESHOLD: every round copies where the observation shows a context draft,
    else drafts one exit-E token (dropped below the threshold: then no draft token); the real
    decoder with it emits greedy decoding's tokens; a copy length the env lacks is refused."""
    from lede_env.env import LEDEEnv
    from lede_env.policies import CopyElseDraftPolicy, policy_from_name

    b, heads, ts, prof = tiny
    env = LEDEEnv.with_objects(trace_set=ts, profile=prof, eos_ids=b.eos_ids, k_max=4, max_new_tokens=24, context_lengths=(2, 4))
    u = env.unwrapped
    thr = float(np.median(np.concatenate([t.draft_prob[:, 1] for t in ts.traces])))  # exit 2's: both branches play
    pol = policy_from_name(f"copy-else:4,2,{thr!r}", u.actions)
    assert isinstance(pol, CopyElseDraftPolicy)
    kinds = set()
    with u.playing(pol):
        for idx in u.playable:
            obs, _ = u.reset(options={"prompt_index": idx})
            done = False
            while not done:
                a = pol.act(obs)
                copy = obs["context"][1] > 0
                assert a == (u.actions.encode(0, 4) if copy else u.actions.encode(2, 1))
                obs, _, te, tr, info = u.step(a)
                rd = info["round"]
                if not copy:
                    kinds.add("kept" if rd["draft_len"] == 1 else "dropped")
                    assert rd["exit_layer"] in (0, 2) and rd["draft_len"] <= 1
                done = te or tr
        dec = env.make_decoder(b, heads)
        for t in ts.traces[:3]:
            res = dec.generate(torch.tensor(t.prompt), pol, 24)
            assert res.tokens == t.generated[:len(res.tokens)].tolist()
    assert kinds == {"kept", "dropped"}  # both branches of the drop rule were played
    with pytest.raises(ValueError, match="context lengths"):
        policy_from_name("copy-else:3,2,0.3", u.actions)


# ---- exit-head files and agreement -----------------------------------------------------------
def test_heads_round_trip_with_acceptance_and_calibration_in_the_key(tiny, calibrated_heads, tmp_path,
                                                                       monkeypatch):
    from lede_env import calibration
    from lede_env.calibration import HeadSpec, heads_key

    b = tiny[0]
    again = ExitHeads(b.stack, (1, 2, 3), "lens")
    again.load_state(calibrated_heads.state())
    assert np.array_equal(again.acceptance.rate, calibrated_heads.acceptance.rate)
    # the calibration prompts' content is in the cache key
    assert heads_key(b, HeadSpec(calib_prompts="humaneval[0:2]"))[0] != heads_key(b, HeadSpec(calib_prompts="humaneval[0:3]"))[0]
    # a shipped file whose checksum fails is ignored (with a warning), never trusted
    key = heads_key(b, HeadSpec((1, 2, 3), "lens", 64, calib_prompts="humaneval[0:2]"))[0]
    assert_damaged_shipped_file_ignored(monkeypatch, calibration, "PACKAGED_HEADS", calibration.packaged_heads, key,
                                        "h.safetensors", tmp_path)


def test_agreement_by_category_weighs_categories_by_positions(tiny):
    """Per category, the agreement of its own continuations; "all", the agreement over every
    position (what :func:`lede_env.exits.agreement` gives on all of them at once)."""
    from lede_env.exits import agreement
    from lede_env.calibration import agreement_by_category

    b, heads, _, _ = tiny
    cs = tiny_continuations(b, 6, seed=3)
    seqs = {c.id: (torch.tensor(c.prompt_ids + c.generated), len(c.prompt_ids)) for c in cs}
    table = agreement_by_category(heads, cs)
    assert set(table) == {c.category for c in cs} | {"all"}
    for cat in {c.category for c in cs}:
        assert table[cat] == pytest.approx(agreement(heads, [seqs[c.id] for c in cs if c.category == cat]))
    assert table["all"] == pytest.approx(agreement(heads, list(seqs.values())))


def test_a_policys_own_stop_rule_is_read_in_one_place_by_the_env_and_the_decoder(tiny_env):
    """own_stop_rule: a policy's stop_rule, else its stop_threshold's rule, else None (the env's or
    decoder's own); LEDEEnv.playing applies exactly that, also to a duck-typed policy object."""
    from lede_env.policies import StaticPolicy, own_stop_rule, reads_observations
    from lede_env.stopping import NO_STOP, ThresholdStop

    class Duck:  # a policy object that is no BasePolicy
        stop_threshold = 0.4

        def act(self, obs):
            return 0

    assert own_stop_rule(Duck()) == ThresholdStop(0.4) and not reads_observations(Duck())
    assert own_stop_rule(StaticPolicy(1)) is NO_STOP and own_stop_rule(object()) is None
    env = tiny_env
    before = env.rules
    with env.playing(Duck()):
        assert env.rules.stop == ThresholdStop(0.4)
    with env.playing(object()):
        assert env.rules.stop.describe() == before.stop.describe()  # no rule of its own: the env's
    assert env.rules is before
