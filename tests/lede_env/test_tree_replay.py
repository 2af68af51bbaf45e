"""Token-tree rounds in trace replay (issue 37): exact against the greedy text, the tree's own
branches, the budget and EOS; the static tree rule; the oracle and the tree actions of the env."""

from __future__ import annotations

import warnings
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from lede_env.costs import CostProfile
from lede_env.datastore import NgramDatastore
from lede_env.mdp import ActionMap
from lede_env.replay import oracle_plan, replay_round, rollout, trace_trees, useful_actions
from lede_env.rules import RoundRules
from lede_env.suffix_index import SuffixIndex
from lede_env.traces import Trace
from lede_env.trees import TreePrune, round_tree

EOS = 7
VOCAB = 5  # a small vocabulary repeats itself: the suffix index finds continuations


def synthetic_trace(prompt, generated, eos: bool) -> Trace:
    """A trace of one exit whose drafts are the greedy tokens shifted by one (tree rounds read only
    the prompt and the greedy text)."""
    gen = np.asarray(list(generated) + ([EOS] if eos else []), np.int64)
    n = len(gen)
    f32 = np.zeros((n, 1), np.float32)
    return Trace("t", "code", np.asarray(prompt, np.int64), gen, eos, np.roll(gen, 1)[:, None].copy(), f32, f32,
                 np.zeros((n, 1), np.int64), np.zeros((n, 0), np.float32), f32 + 0.5)


def profile() -> CostProfile:
    """Verification grows with the positions verified, an exit draft costs a little."""
    return CostProfile(num_layers=2, layer=[1.0 + 0.08 * k for k in range(20)], head=[0.3 + 0.02 * k for k in range(20)],
                       draft_head=0.05)


def expected_branch(tree, target) -> list[int]:
    """The longest root path of ``tree`` whose tokens are a prefix of ``target``, from the paths
    themselves (not :meth:`TokenTree.accepted`)."""
    best: list[int] = []
    for i in range(len(tree)):
        path = tree.path(i)
        if len(path) > len(best) and list(target[: len(path)]) == path:
            best = path
    return best


@st.composite
def cases(draw):
    prompt = draw(st.lists(st.integers(0, VOCAB - 1), min_size=2, max_size=24))
    # the continuation often copies the prompt (so trees are accepted), sometimes wanders
    gen = [draw(st.sampled_from(prompt)) if draw(st.booleans()) else draw(st.integers(0, VOCAB - 1))
           for _ in range(draw(st.integers(2, 24)))]
    eos = draw(st.booleans())
    if eos and draw(st.booleans()):  # EOS also inside the prompt: a branch may hold it
        prompt = prompt + [EOS] + prompt[:3]
    budgets = tuple(sorted(set(draw(st.lists(st.integers(1, 12), min_size=1, max_size=3)))))
    depth = draw(st.integers(1, 6))
    bonus = draw(st.booleans())
    store = (NgramDatastore([draw(st.lists(st.integers(0, VOCAB - 1), min_size=4, max_size=30)) for _ in range(3)],
                            min_count=1) if draw(st.booleans()) else None)
    lam = draw(st.sampled_from([None, 0.8, 1.5]))
    max_new = draw(st.integers(2, 30))
    actions = draw(st.lists(st.integers(0, 1 + 1 + len(budgets) + 3 - 1), min_size=1, max_size=40))
    return prompt, gen, eos, budgets, depth, bonus, store, lam, max_new, actions


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_tree_rounds_replay_the_greedy_text_and_the_longest_matching_branch(case):
    prompt, gen, eos, budgets, depth, bonus, store, lam, max_new, actions = case
    trace = synthetic_trace(prompt, gen, eos)
    acts = ActionMap((1,), 3, (2,), budgets)
    rules = RoundRules(acts, profile(), bonus, (EOS,), context_draft=0, datastore=store, tree_depth=depth)
    if lam is not None:
        rules = replace(rules, tree_prune=TreePrune.from_profile(rules.profile, max(budgets), lam))
    limit = max_new if trace.eos else min(max_new, trace.n)
    g, out, i = 1, [int(trace.generated[0])], 0
    done = limit <= 1 or (trace.eos and trace.n == 1)
    while not done:
        a = actions[i % len(actions)]
        i += 1
        oc, E, cost = replay_round(trace, g, a, rules, limit)
        nodes, d = rules.plan_tree(a, limit - g)
        if nodes:  # a tree round: the tree rebuilt here from a fresh index, the branch from its paths
            seq = np.concatenate([trace.prompt, trace.generated[:g]]).tolist()
            tree = round_tree(SuffixIndex(seq), seq, nodes, d, store, rules.context_ngram, rules.tree_prune)
            assert len(tree) <= nodes and (not len(tree) or int(tree.depth.max()) <= d)
            target = trace.generated[g:].tolist()
            branch = expected_branch(tree, target)
            assert E == 0 and oc.draft_len == len(tree) and oc.n_verify == len(tree) + 1
            assert oc.accepted == min(len(branch), len(oc.emitted))
            assert oc.emitted == (branch + target[len(branch): len(branch) + 1])[: len(oc.emitted)]
            assert cost == pytest.approx(rules.cost(0, len(tree), len(tree) + 1, tree=True))
            event(f"tree round accepting {min(len(branch), 2)}+ tokens" + (", EOS" if oc.eos else ""))
        out += oc.emitted
        assert out == trace.generated[: len(out)].tolist()  # always the greedy text
        g += len(oc.emitted)
        done = oc.done
    assert len(out) == (trace.n if trace.eos and trace.n <= limit else limit)


def test_tree_actions_in_the_action_map_and_the_round_plan():
    acts = ActionMap((2, 4), 3, (1, 4), (2, 8))
    assert (acts.first_tree_action, acts.first_exit_action, acts.n) == (3, 5, 11)
    assert [acts.tree_budget(a) for a in range(acts.n)] == [0, 0, 0, 2, 8, 0, 0, 0, 0, 0, 0]
    assert acts.decode(3) == acts.decode(4) == (0, 0) and acts.decode(5) == (2, 1)
    assert acts.encode_tree(8) == 4
    with pytest.raises(ValueError, match="Tree budget 3"):
        acts.encode_tree(3)
    with pytest.raises(ValueError, match="tree_budgets"):
        ActionMap((2,), 3, (), (4, 4))
    rules = RoundRules(acts, None, tree_depth=6)
    assert rules.plan_tree(4, 100) == (8, 6)
    assert rules.plan_tree(4, 3) == (8, 2)  # the depth is clamped as a draft length is
    assert rules.plan_tree(4, 1) == (0, 0)  # no room for a draft: not a tree round
    assert rules.plan_tree(0, 100) == rules.plan_tree(2, 100) == rules.plan_tree(5, 100) == (0, 0)
    assert replace(rules, bonus=False).plan_tree(3, 1) == (2, 1)


def test_a_tree_round_at_the_budget_end_is_an_ar_step_and_an_eos_in_the_branch_ends_the_episode():
    prompt = [1, 2, EOS, 3, 1, 2, EOS, 3]
    trace = synthetic_trace(prompt + [1], [2], eos=True)  # greedy: 2, EOS
    acts = ActionMap((1,), 3, (), (4,))
    rules = RoundRules(acts, profile(), True, (EOS,), tree_depth=4)
    a = acts.encode_tree(4)
    # the pending token 2 after "1": the tree's branch is 2 EOS 3 ... -> EOS accepted, then it stops
    oc, E, cost = replay_round(trace, 1, a, rules, 10)
    assert oc.emitted == [EOS] and oc.eos and oc.done and oc.accepted == 1 and oc.draft_len >= 2
    # one token of budget left: no tree, an AR step
    oc, E, cost = replay_round(trace, 1, a, rules, 2)
    assert oc.emitted == [EOS] and oc.draft_len == 0 and oc.n_verify == 1 and oc.accepted == 0
    assert cost == pytest.approx(rules.cost(0, 0, 1))


def test_the_tree_memo_is_exact_at_every_position_and_depth():
    rng = np.random.default_rng(0)
    trace = synthetic_trace(rng.integers(0, 4, 30).tolist(), rng.integers(0, 4, 20).tolist(), eos=False)
    rules = RoundRules(ActionMap((1,), 3, (), (6,)), profile(), tree_depth=4)
    memo = trace_trees(trace)
    assert trace_trees(trace) is memo
    for depth in (4, 2):  # the swept depth, a clamped one
        for g in range(1, trace.n + 1):
            seq = np.concatenate([trace.prompt, trace.generated[:g]]).tolist()
            ref = round_tree(SuffixIndex(seq), seq, 6, depth)
            got = memo.tree(g, 6, depth, rules)
            assert got.tokens.tolist() == ref.tokens.tolist() and got.parents.tolist() == ref.parents.tolist()
    with pytest.raises(ValueError, match="outside 1"):
        memo.tree(0, 6, 4, rules)


def test_tree_prune_keeps_the_prefix_that_pays():
    costs = (1.0, 1.1, 1.5, 1.6)
    rule = TreePrune(1.0, costs)
    # expected tokens - cost of 0..3 nodes: 0, 0.4, 0.3, 0.4: the first best, one node
    assert rule.keep([0.5, 0.3, 0.2]) == 1
    assert rule.keep([]) == 0 and rule.keep([0.01]) == 0
    assert TreePrune(0.1, costs).keep([0.5, 0.3, 0.2]) == 3  # a low lambda keeps everything
    with pytest.raises(ValueError, match="cost table"):
        rule.keep([0.5] * 4)
    with pytest.raises(ValueError, match="positive finite"):
        TreePrune(0.0, costs)
    with pytest.raises(ValueError, match="from_profile"):
        TreePrune(1.0, ())
    prof = profile()
    rule = TreePrune.from_profile(prof, 4, 1.5)
    assert len(rule.costs) == 5 and rule.costs[0] == pytest.approx(prof.round_cost(0, 0, 1))
    assert rule.costs[3] == pytest.approx(prof.round_cost(0, 3, 4, tree=True))


@pytest.fixture(scope="module")
def tree_env(tiny):
    from lede_env.env import LEDEEnv

    b, heads, ts, prof = tiny
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LEDEEnv.with_objects(trace_set=ts, profile=prof, eos_ids=b.eos_ids, k_max=4, max_new_tokens=32,
                                    context_lengths=(2, 4), tree_budgets=(2, 6), tree_depth=4, progress=False)


def test_trace_env_with_tree_actions(tree_env):
    from gymnasium.utils.env_checker import check_env

    from lede_env.episodes import play_episode
    from lede_env.policies import StaticPolicy

    u = tree_env
    assert u.actions.tree_budgets == (2, 6) and u.rules.tree_depth == 4
    assert u.config()["tree_budgets"] == [2, 6]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check_env(u, skip_render_check=True)
    a = u.actions.encode_tree(6)
    pol = StaticPolicy(a)
    with u.playing(pol):
        ep = play_episode(u, pol, seed=0, options={"prompt_index": u.playable[0]})
    ref = rollout(u.trace_set.traces[u.playable[0]], u.rules.without_overhead(), u.max_new_tokens, lambda g: a)
    assert (ep.totals.tokens, ep.totals.drafted, ep.totals.accepted) == (ref["tokens"], ref["drafted"], ref["accepted"])
    assert all(o["history"].max() <= 1.0 for o in ep.observations)  # 6 nodes > k_max: clipped


def test_the_oracle_with_trees_is_at_least_the_oracle_without(tree_env):
    u = tree_env
    rules = u.rules.without_overhead()
    without = replace(rules, actions=ActionMap(u.actions.exit_layers, u.actions.k_max, u.actions.context_lengths))
    used = 0
    for i in u.playable:
        t = u.trace_set.traces[i]
        plan, ctg = oracle_plan(t, rules, u.max_new_tokens)
        ctg0 = oracle_plan(t, without, u.max_new_tokens)[1]
        assert ctg[1] <= ctg0[1] + 1e-9
        best = rollout(t, rules, u.max_new_tokens, lambda g: int(plan[g]))
        assert best["cost"] == pytest.approx(ctg[1])
        used += sum(u.actions.tree_budget(int(plan[g])) > 0 for g in range(1, len(plan)))
    assert used  # the tiny model's text repeats enough for trees to pay somewhere


def test_useful_actions_bound_a_tree_by_its_depth():
    acts = ActionMap((1,), 2, (), (1, 16))
    flat = CostProfile(num_layers=2, layer=[1.0] * 20, head=[0.3] * 20, draft_head=0.05)
    steep = CostProfile(num_layers=2, layer=[1.0 + 0.6 * k for k in range(20)], head=[0.3] * 20, draft_head=0.05)
    assert set(useful_actions(RoundRules(acts, flat, tree_depth=2))) >= {1, 2}
    # verifying n+1 positions costs 1 + 0.52 n: one node emits at most 2 tokens (2 / 1.52 > 1), and 16
    # nodes of depth 2 at most 3 (but a tree of 2 nodes can: the bound takes the best n <= B)
    kept = useful_actions(RoundRules(acts, steep, tree_depth=2))
    assert 1 in kept and 2 in kept
    steeper = CostProfile(num_layers=2, layer=[1.0 + 1.2 * k for k in range(20)], head=[0.3] * 20, draft_head=0.05)
    assert not {1, 2} & set(useful_actions(RoundRules(acts, steeper, tree_depth=2)))


def test_tree_policies_by_name_and_their_rule_in_the_env(tree_env):
    from lede_env.policies import TreeRulePolicy, own_tree_prune, policy_from_name, tree_budgets_of

    u = tree_env
    p = policy_from_name("tree:6", u.actions, u.profile)
    assert p.act(None) == u.actions.encode_tree(6) and own_tree_prune(p) is None
    r = policy_from_name("tree-rule:6,1.5", u.actions, u.profile)
    assert isinstance(r, TreeRulePolicy) and r.act(None) == u.actions.encode_tree(6) and r.tree_prune.lam == 1.5
    assert own_tree_prune(policy_from_name("guarded:tree-rule:6,1.5", u.actions, u.profile)) == r.tree_prune
    assert tree_budgets_of("tree-rule:6,1.5") == tree_budgets_of("guarded:tree:6") == (6,)
    assert tree_budgets_of("static:0,4") == ()
    with pytest.raises(ValueError, match="tree:B"):
        policy_from_name("tree:", u.actions, u.profile)
    with pytest.raises(ValueError, match="Tree budget 5"):
        policy_from_name("tree:5", u.actions, u.profile)
    with pytest.raises(ValueError, match="cost profile"):
        policy_from_name("tree-rule:6,1.5", u.actions, None)
    assert u.rules.tree_prune is None
    with u.playing(r):
        assert u.rules.tree_prune is r.tree_prune
    assert u.rules.tree_prune is None
