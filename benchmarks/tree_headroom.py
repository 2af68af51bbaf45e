"""Headroom of token-tree drafts over today's single copy draft (SuffixDecoding, arXiv 2411.04975).

On the held-out traces of the studied task (greedy continuations, exact), at every round position
reached by the best static copy policy (copy <= 4, action (0, 4)) and by AR (every position), it
compares the draft tokens accepted from the single copy draft (prompt lookup, then the model's
datastore: :func:`lede_env.datastore.with_datastore`) with those of the best branch of a token
tree of B nodes (B in ``--budgets``) grown best-first from two suffix indexes
(:mod:`lede_env.suffix_index`): one over the prompt and the text generated so far, extended token
by token, and one over the datastore's text (SuffixDecoding, arXiv 2411.04975). ``tree-B+copy``
seeds the tree with the single copy's branch first (the tree then contains the copy draft).

It then estimates trace-env throughput (tokens per AR-step unit of cost, overhead not charged)
of policies that verify a tree each round, charging a tree of n nodes the cost profile's verify
cost of n + 1 positions (the pending token and the nodes: ``round_cost(0, n, n + 1)``): a fixed
budget, a budget pruned to the nodes whose estimated path probability is at least the marginal
cost of one verified position, and the hindsight oracles (dynamic programming over each trace)
over today's actions with and without tree actions. Deterministic; about a minute on 2 cores.

    python benchmarks/tree_headroom.py [--cost-profile analytic|measured] [--budgets 2 4 8 16]
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections import defaultdict

import numpy as np

CATEGORIES = ("code", "code_editing", "math", "passage_qa", "roleplay", "summarization", "translation", "writing")


def prune(tree, threshold: float):
    """The nodes of ``tree`` whose score is at least ``threshold`` (scores never grow down a
    branch, so a kept node's ancestors are kept)."""
    import torch

    from lede_env.suffix_index import TokenTree
    keep = torch.nonzero(tree.scores >= threshold).flatten()
    remap = {int(k): i for i, k in enumerate(keep.tolist())}
    parents = torch.tensor([remap.get(int(p), -1) for p in tree.parents[keep].tolist()], dtype=torch.int64)
    return TokenTree(tree.tokens[keep], parents, tree.depth[keep], tree.counts[keep], tree.scores[keep])


def tree_round(tree, trace, g: int, remaining: int, rules):
    """``(outcome, cost)`` of verifying ``tree`` at position ``g`` (the best branch accepted,
    then the verifier's token), exact from the trace's greedy text."""
    from lede_env.mdp import accept
    target = trace.generated[g:g + int(tree.depth.max()) + 1].tolist() if len(tree) else trace.generated[g:g + 1].tolist()
    branch = tree.accepted(target)
    draft = tree.path(branch[-1]) if branch else []
    oc = accept(draft, target[: len(draft) + 1], remaining, rules.eos_ids)
    n = len(tree)
    return oc, rules.profile.round_cost(0, n, n + 1) - rules.profile.overhead / rules.profile.ar_step


def position_table(trace, rules, store, budgets, max_depth, threshold, limit):
    """Per position g (1 .. limit-1): ``{g: {"copy": outcome, "copy_cost": c, ("tree", B): (outcome,
    cost), ("seed", B): ..., ("pruned", B): ...}}`` and the query times (seconds)."""
    from lede_env.datastore import with_datastore
    from lede_env.lookup import context_match
    from lede_env.mdp import clamp_draft_len
    from lede_env.replay import replay_round
    from lede_env.suffix_index import SuffixIndex, draft_tree
    ctx = SuffixIndex(trace.prompt.tolist())
    out, times = {}, []
    seq = trace.prompt.tolist()
    for g in range(1, min(limit, trace.n)):  # (past an EOS nothing is generated)
        tok = int(trace.generated[g - 1])
        ctx.extend(tok)
        seq.append(tok)
        remaining = limit - g
        depth = clamp_draft_len(max_depth, remaining, rules.bonus)
        row = {}
        oc, _, c = replay_round(trace, g, 4, rules, limit)
        row["copy"], row["copy_cost"] = oc, c
        copy = with_datastore(context_match(seq, clamp_draft_len(4, remaining, rules.bonus), rules.context_ngram),
                              seq, clamp_draft_len(4, remaining, rules.bonus), rules.datastore)[1]
        for B in budgets:
            t0 = time.perf_counter()
            tree = draft_tree([ctx, store], seq, B, depth) if depth else draft_tree([], seq, 0)
            times.append(time.perf_counter() - t0)
            row[("tree", B)] = tree_round(tree, trace, g, remaining, rules)
            row[("pruned", B)] = tree_round(prune(tree, threshold), trace, g, remaining, rules)
            seeded = draft_tree([ctx, store], seq, B, depth, seed=copy) if depth else tree
            row[("seed", B)] = tree_round(seeded, trace, g, remaining, rules)
        out[g] = row
    return out, times


def static_path(trace, rules, limit, action: int) -> list[int]:
    """The positions a static action's rounds start at."""
    from lede_env.replay import replay_round
    g, path = 1, []
    while g < limit:
        path.append(g)
        oc = replay_round(trace, g, action, rules, limit)[0]
        if oc.done:
            break
        g += len(oc.emitted)
    return path


def accepted_rows(tables, paths, budgets) -> tuple[list, list]:
    """Mean accepted draft tokens per round and rescue shares, per category (and all)."""
    acc, rescue = defaultdict(lambda: defaultdict(float)), defaultdict(lambda: defaultdict(float))
    for (cat, table), path in zip(tables, paths):
        for key in (cat, "all"):
            for g in path:
                row = table[g]
                a, r = acc[key], rescue[key]
                a["rounds"] += 1
                r["rounds"] += 1
                a["copy<=4"] += row["copy"].accepted
                copy_first_wrong = row["copy"].accepted == 0
                r["copy proposes, 1st rejected"] += copy_first_wrong and row["copy"].draft_len > 0
                for B in budgets:
                    a[f"tree-{B}"] += row[("tree", B)][0].accepted
                    r[f"tree-{B} rescues"] += copy_first_wrong and row[("tree", B)][0].accepted > 0
                    r[f"tree-{B} rescues a rejected copy"] += (copy_first_wrong and row["copy"].draft_len > 0
                                                               and row[("tree", B)][0].accepted > 0)
                a[f"tree-{budgets[-1]}+copy"] += row[("seed", budgets[-1])][0].accepted
    rows_a, rows_r = [], []
    for key in [*CATEGORIES, "all"]:
        if key not in acc:
            continue
        n = acc[key]["rounds"]
        rows_a.append({"category": key, "rounds": int(n), **{k: v / n for k, v in acc[key].items() if k != "rounds"}})
        rows_r.append({"category": key, "rounds": int(n), **{k: v / n for k, v in rescue[key].items() if k != "rounds"}})
    return rows_a, rows_r


def rollout(table, limit, pick) -> tuple[int, float]:
    """Tokens and cost of the policy ``pick(row) -> (outcome, cost)`` over one trace's positions."""
    g, tokens, cost = 1, 0, 0.0
    while g < limit:
        oc, c = pick(table[g])
        tokens += len(oc.emitted)
        cost += c
        if oc.done:
            break
        g += len(oc.emitted)
    return tokens, cost


def oracle(trace, table, rules, limit, actions, budgets) -> tuple[int, float]:
    """Hindsight oracle over ``actions`` (and tree budgets): least total cost (DP over g)."""
    from lede_env.replay import replay_round
    end = min(limit, trace.n)
    ctg = np.zeros(limit + 1)
    for g in range(end - 1, 0, -1):
        options = [replay_round(trace, g, a, rules, limit)[::2] for a in actions]
        options += [table[g][("tree", B)] for B in budgets] + [table[g][("seed", B)] for B in budgets]
        ctg[g] = min(c + (0.0 if oc.done else ctg[g + len(oc.emitted)]) for oc, c in options)
    return end - 1, float(ctg[1])


def throughput_rows(traces, tables, rules, limits, budgets, useful) -> list:
    """Per category: each policy's throughput and its ratio to copy <= 4."""
    pol = {"copy<=4": lambda r: (r["copy"], r["copy_cost"])}
    for B in budgets:
        pol[f"tree-{B}"] = lambda r, B=B: r[("tree", B)]
        pol[f"tree-{B} pruned"] = lambda r, B=B: r[("pruned", B)]
        pol[f"tree-{B}+copy"] = lambda r, B=B: r[("seed", B)]
    tot = defaultdict(lambda: defaultdict(lambda: [0, 0.0]))
    for t, table, limit in zip(traces, tables, limits):
        res = {name: rollout(table, limit, p) for name, p in pol.items()}
        res["copy<=8"] = _static(t, rules, limit, 6)
        res["oracle: today's actions"] = oracle(t, table, rules, limit, useful, [])
        res["oracle: + trees"] = oracle(t, table, rules, limit, useful, budgets)
        for key in (t.category, "all"):
            for name, (n, c) in res.items():
                tot[key][name][0] += n
                tot[key][name][1] += c
    rows = []
    for key in [*CATEGORIES, "all"]:
        if key in tot:
            base = tot[key]["copy<=4"][0] / tot[key]["copy<=4"][1]
            rows.append({"category": key, "copy<=4 (x AR)": base,
                         **{f"{name} / copy<=4": n / c / base for name, (n, c) in tot[key].items() if name != "copy<=4"}})
    return rows


def _static(trace, rules, limit, action) -> tuple[int, float]:
    from lede_env.replay import replay_round
    g, tokens, cost = 1, 0, 0.0
    while g < limit:
        oc, _, c = replay_round(trace, g, action, rules, limit)
        tokens, cost = tokens + len(oc.emitted), cost + c
        if oc.done:
            break
        g += len(oc.emitted)
    return tokens, cost


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cost-profile", default="analytic")
    ap.add_argument("--budgets", type=int, nargs="+", default=[2, 4, 8, 16])
    ap.add_argument("--max-depth", type=int, default=8)
    args = ap.parse_args()
    from agents.tables import to_markdown
    from lede_env.config import studied_task
    from lede_env.env import LEDEEnv
    from lede_env.prompts import DEFAULT_EVAL
    from lede_env.replay import budget, useful_actions
    from lede_env.suffix_index import SuffixIndex

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        env = LEDEEnv(studied_task().replace(prompts=DEFAULT_EVAL, cost_profile=args.cost_profile), progress=False)
    u = env.unwrapped
    rules = u.rules.without_overhead()
    assert u.actions.decode(4) == (0, 4)
    t0 = time.perf_counter()
    store = SuffixIndex.of_documents(rules.datastore.sequences)
    build = time.perf_counter() - t0
    threshold = rules.profile.verify_cost(2) - rules.profile.verify_cost(1)  # one more verified position
    traces = [u.trace_set.traces[i] for i in u.playable]
    limits = [budget(t, u.max_new_tokens) for t in traces]
    tables, times = [], []
    for t, limit in zip(traces, limits):
        table, ts = position_table(t, rules, store, args.budgets, args.max_depth, threshold, limit)
        tables.append(table)
        times += ts
    cats = [t.category for t in traces]
    print(f"Held-out {DEFAULT_EVAL}: {len(traces)} traces, {sum(map(len, tables))} positions; cost profile "
          f"{args.cost_profile} (verify cost of n positions: {[round(rules.profile.verify_cost(k), 3) for k in (1, 2, 5, 9, 17)]} "
          f"for n = 1, 2, 5, 9, 17); max depth {args.max_depth}; pruning threshold {threshold:.3f}.")
    print(f"Datastore index: {store.tokens} tokens, {store.states} states, built in {build:.2f} s; tree query "
          f"(both indexes, all budgets): median {1e6 * np.median(times):.0f} us, p99 {1e6 * np.percentile(times, 99):.0f} us.\n")
    for name, path in (("static copy<=4 (0,4)", None), ("AR", "all")):
        paths = [sorted(tb) if path else static_path(t, rules, lim, 4) for t, lim, tb in zip(traces, limits, tables)]
        rows_a, rows_r = accepted_rows(list(zip(cats, tables)), paths, args.budgets)
        print(f"### Rounds on the {name} path: mean accepted draft tokens per round\n")
        print(to_markdown(rows_a) + "\n")
        print(f"### Rounds on the {name} path: share of rounds where the copy accepts nothing but a tree branch's "
              f"first token is accepted ('rescues'; 'a rejected copy': the copy proposed and its first token was wrong)\n")
        print(to_markdown(rows_r) + "\n")
    print("### Trace-env throughput (tokens per AR-step cost, overhead not charged), relative to copy<=4\n")
    print(to_markdown(throughput_rows(traces, tables, rules, limits, args.budgets, useful_actions(rules))))


if __name__ == "__main__":
    main()
