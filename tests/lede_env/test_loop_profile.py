"""Cost profiles fitted to rounds of the real decoding loop (lede_env.loop_profile, costs.fit_profile)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lede_env.costs import CostProfile, fit_profile, round_terms
from lede_env.loop_profile import measure_loop_profile, time_rounds
from lede_env.policies import DesignPolicy

L, M = 12, 5  # layers; positions the profile covers (K_max = 4)


def _profile(c2: float = 1.3, scale: float = 1.0) -> CostProfile:
    """A profile with one layer 1 ms (x scale) on 1 position, c(2) = ``c2`` and a gentle slope after."""
    layer = [1e-3 * scale * f for f in (1.0, c2, c2 + 0.05, c2 + 0.1, c2 + 0.2)]
    head = [4e-3 * scale * f for f in (1.0, c2, c2 + 0.05, c2 + 0.15, c2 + 0.3)]
    return CostProfile(num_layers=L, layer=layer, head=head, draft_head=0.4e-3 * scale, overhead=0.2e-3,
                       source="measured")


@settings(max_examples=200, deadline=None)
@given(e=st.integers(0, L - 1), k=st.integers(0, M - 1), extra=st.booleans(), passes=st.integers(0, M),
       reuse=st.booleans())
def test_round_terms_is_round_cost_as_a_linear_form(e, k, extra, passes, reuse):
    prof = _profile()
    n = max(min(k + int(extra), M), 1) if e > 0 else k + 1  # a context draft verifies the pending token + k copied ones
    passes = 0 if e == 0 else max(passes, k)
    theta = np.array(prof.layer + prof.head + [prof.draft_head])
    t = round_terms(L, M, e, k, n, passes, reuse) @ theta
    assert t + prof.overhead == pytest.approx(prof.round_cost(e, k, n, reuse=reuse, passes=passes) * prof.ar_step)


def test_round_terms_rejects_positions_past_the_profile():
    with pytest.raises(ValueError, match="exceeds the profile"):
        round_terms(L, M, 2, 5, 6)


def _rounds(true: CostProfile, n: int, seed: int, noise: float = 0.0, outliers: int = 0):
    """Random rounds (AR steps, context drafts, every exit and K) timed by ``true``."""
    rng = np.random.default_rng(seed)
    theta = np.array(true.layer + true.head + [true.draft_head])
    out = []
    for i in range(n):
        e = 0 if rng.random() < 0.3 else int(rng.integers(1, L))
        k = int(rng.integers(0, M)) if e == 0 else int(rng.integers(1, M))
        nv = k + 1
        t = round_terms(L, M, e, k, nv, k if e else 0) @ theta * (1 + noise * rng.standard_normal())
        out.append((e, k, nv, k if e else 0, float(t * (3.0 if i < outliers else 1.0))))
    return out


def test_fit_recovers_the_loop_times_the_isolated_profile_misses():
    # the loop: 2 positions cost 1.3x one and everything is 10 % slower; the prior (isolated
    # timings) says 1.05x and the old speed
    true, prior = _profile(c2=1.3, scale=1.1), _profile(c2=1.05)
    rounds = _rounds(true, 300, seed=0, noise=0.02, outliers=8)
    fit = fit_profile(rounds, prior)
    assert fit.source == "in-loop"
    assert fit.overhead == prior.overhead
    assert fit.meta["outliers"] >= 8  # the 3x rounds are dropped
    for e, k in ((0, 0), (0, 3), (1, 1), (2, 1), (3, 2), (6, 4), (11, 1)):
        n = k + 1
        assert fit.round_cost(e, k, n) * fit.ar_step == pytest.approx(true.round_cost(e, k, n) * true.ar_step, rel=0.02)
    assert fit.verify_cost(2) == pytest.approx(true.verify_cost(2), rel=0.03)
    assert fit.meta["median_rel_error"] < 0.03 < fit.meta["prior_median_rel_error"]


def test_fit_is_exact_on_noise_free_rounds():
    true = _profile(c2=1.25, scale=0.9)
    fit = fit_profile(_rounds(true, 200, seed=1), _profile(c2=1.0), prior_weight=1e-6)
    assert fit.meta["median_rel_error"] < 1e-4


def test_fit_needs_enough_rounds():
    with pytest.raises(ValueError, match="at least 11 timed rounds"):
        fit_profile(_rounds(_profile(), 5, seed=0), _profile())


def test_design_policy_draws_action_zero_and_every_exit_action_in_runs():
    pol = DesignPolicy(13, p_action0=0.3, seed=0, max_run=4)
    acts = [pol.act(None) for _ in range(8000)]
    assert set(acts) == set(range(13))
    # runs of 1..4 rounds (mean 2.5): at least 1 - 1/2.5 of consecutive pairs repeat an action
    assert np.mean(np.diff(acts) == 0) > 0.58
    single = DesignPolicy(13, p_action0=0.3, seed=1, max_run=1)
    acts1 = [single.act(None) for _ in range(8000)]  # independent draws: P(same twice) = 0.3^2 + 0.7^2 / 12
    assert abs(np.mean(np.diff(acts1) == 0) - (0.09 + 0.49 / 12)) < 0.02
    assert abs(acts.count(0) / len(acts) - 0.3) < 0.05  # runs of mean 2.5: about 3200 runs drawn
    with pytest.raises(ValueError):
        DesignPolicy(0)
    with pytest.raises(ValueError):
        DesignPolicy(3, max_run=0)


def test_loop_profile_on_a_tiny_model(tiny):
    b, heads, ts, prior = tiny
    prompts = [[5, 6, 7, 5, 6, 7, 5, 6], [9, 10, 11, 12]]
    timed = []
    prof = measure_loop_profile(b.stack, heads, 3, prompts, prior, b.eos_ids, rounds=60, max_new_tokens=16,
                                timed=timed)
    assert len(timed) >= 60
    assert {r[0] for r in timed} >= {0, 1, 2, 3}  # AR/context rounds and every exit
    assert all(sec > 0 and n >= 1 for _, _, n, _, sec in timed)
    assert prof.source == "in-loop" and prof.num_layers == b.stack.num_layers
    assert prof.max_positions == prior.max_positions
    assert all(t > 0 for t in prof.layer + prof.head) and prof.draft_head > 0
    with pytest.raises(ValueError):
        time_rounds(b.stack, heads, 3, [], b.eos_ids)
    for e, k, n, p, _ in timed:  # (E, K, n_verify, passes) as the decoder reports them
        if e == 0:  # an AR step or a context draft: the pending token + k copied ones, no draft pass
            assert n == k + 1 and p == 0
        else:
            assert n in (k, k + 1) and p >= k


def test_measured_means_in_loop_and_each_kind_is_cached_once(tmp_path, monkeypatch):
    import lede_env.loop_profile as costs_mod  # (get_profile builds profiles there, above the decoder)
    from lede_env.exits import ExitHeads
    from lede_env.mdp import ObservationConfig

    from ..conftest import make_tiny

    monkeypatch.setenv("LEDE_CACHE_DIR", str(tmp_path))
    b = make_tiny()
    heads = ExitHeads(b.stack, (1, 2))
    calls = []

    def fake_loop(bundle, hs, k_max, prior, obs=None):  # the real one decodes DEFAULT_CALIB prompts (a tokenizer)
        calls.append(prior.source)
        assert obs == ObservationConfig()  # the overhead is timed for the env's own observation
        return CostProfile(**(prior.to_json() | {"source": "in-loop"}))

    monkeypatch.setattr(costs_mod, "loop_profile", fake_loop)
    obs = ObservationConfig()
    p = costs_mod.get_profile("measured", b, heads, 3, obs)
    assert p.source == "in-loop" and calls == ["measured"]  # fitted from the isolated profile
    assert costs_mod.get_profile("measured", b, heads, 3, obs) == p and len(calls) == 1  # cached
    assert costs_mod.get_profile("isolated", b, heads, 3, obs).source == "measured"
    paths = {costs_mod.profile_path(b, heads, 3, obs, kind) for kind in ("measured", "isolated")}
    assert len(paths) == 2 and all(q.exists() for q in paths)


def test_fitted_times_never_fall_with_more_positions():
    # rounds where 4 positions look cheap (noise on a few rounds) must not give c(4) < c(3)
    true = _profile(c2=1.2)
    rounds = [r if r[2] != 4 else r[:4] + (r[4] * 0.8,) for r in _rounds(true, 300, seed=3, noise=0.02)]
    fit = fit_profile(rounds, _profile(c2=1.2))
    assert all(b >= a for a, b in zip(fit.layer, fit.layer[1:]))
    assert all(b >= a for a, b in zip(fit.head, fit.head[1:]))


def test_loop_overhead_is_the_observation_and_probe_timed_in_the_loop(tiny):
    from lede_env.loop_profile import loop_probe
    from lede_env.mdp import ObservationConfig

    b, heads, ts, prior = tiny
    seen = []
    probe = loop_probe()

    def counting(decoder, obs):
        seen.append(sorted(obs))
        probe(decoder, obs)

    obs = ObservationConfig(kind="compact", stat_exits=0, context=True)
    prof = measure_loop_profile(b.stack, heads, 3, [[5, 6, 7, 5, 6, 7, 5, 6]], prior, b.eos_ids, rounds=30,
                                max_new_tokens=16, obs_config=obs, probe=counting)
    assert len(seen) >= 30 and seen[0] == ["context", "experience", "history", "progress"]
    assert prof.meta["overhead"] == "in-loop" and prof.meta["prior_overhead"] == prior.overhead
    assert 0 < prof.overhead < 0.1  # seconds: the median observation + probe time of a round
    plain = measure_loop_profile(b.stack, heads, 3, [[5, 6, 7]], prior, b.eos_ids, rounds=20, max_new_tokens=8)
    assert plain.overhead == prior.overhead and "overhead" not in plain.meta
