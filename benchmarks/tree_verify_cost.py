"""Verify cost of a token tree of n nodes against a copy draft's verify of n + 1 positions.

Part 1 (isolated, :func:`lede_env.costs.measure_tree_verify`): with 256 cached positions, the
time of one pass of all L layers and the LM head over n + 1 positions under a tree attention mask
(mask and depth positions built, the cache compacted to a branch after) against a causal pass over
as many positions, n in ``--nodes``, interleaved, fastest and median of ``--repeats``.

Part 2 (in the decoding loop): the real decoder on ``--prompts`` with a policy alternating tree
actions (budgets ``--nodes``) and copy actions (lengths ``--nodes``); the median round time
(policy excluded) per number of verified positions, tree rounds (the round's tree built by
:func:`lede_env.trees.round_tree` included) against copy rounds. Threads: ``--threads``.

    python benchmarks/tree_verify_cost.py --threads 1
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict


def in_loop(bundle, nodes, prompts, max_new_tokens, repeats):
    """``{(tree, n_verify): [seconds]}`` of rounds decoded with alternating tree and copy actions."""
    import torch

    from lede_env.continuations import encode_prompts
    from lede_env.decoding import SelfSpeculativeDecoder, SequencePolicy
    from lede_env.exits import ExitHeads
    from lede_env.prompts import load_prompts

    heads = ExitHeads(bundle.stack, (4,), "lens", draft_vocab=None)
    dec = SelfSpeculativeDecoder(bundle.stack, heads, 1, bundle.eos_ids, context_lengths=tuple(nodes),
                                 tree_budgets=tuple(nodes), tree_depth=8)
    a = dec.actions
    acts = [x for b in nodes for x in (a.encode_tree(b), a.encode(0, b))]
    seconds = defaultdict(list)
    ids = encode_prompts(bundle, load_prompts(prompts), max_new_tokens)
    dec.generate(torch.tensor(ids[0]), SequencePolicy(acts * 100), 8)  # warm-up
    for r in range(repeats):
        for x in ids:
            out = dec.generate(torch.tensor(x), SequencePolicy((acts[r:] + acts[:r]) * 100), max_new_tokens)
            for rec in out.rounds[2:]:
                seconds[rec.tree, rec.n_verify].append(rec.seconds - rec.policy_seconds)
    return seconds


def main() -> None:
    import torch

    from lede_env.costs import measure_tree_verify
    from lede_env.model import get_bundle

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, nargs="+", default=[2, 4, 8, 12, 16])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--prompts", default="context[0:4]+humaneval[0:4]")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--loop-repeats", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    b = get_bundle(None)
    print(f"{torch.get_num_threads()} threads, kernels {b.stack.kernels_tag}")
    t = measure_tree_verify(b.stack, args.nodes, repeats=args.repeats)
    print("| nodes n | copy verify n+1, ms (min / median) | tree verify, ms (min / median) | tree / copy (min / median) |")
    print("|---|---|---|---|")
    for n, v in t.items():
        print(f"| {n} | {1e3 * v['copy']:.2f} / {1e3 * v['copy_median']:.2f} | {1e3 * v['tree']:.2f} / "
              f"{1e3 * v['tree_median']:.2f} | {v['tree'] / v['copy']:.3f} / {v['tree_median'] / v['copy_median']:.3f} |")
    s = in_loop(b, args.nodes, args.prompts, args.max_new_tokens, args.loop_repeats)
    print("\nIn the decoding loop: median round ms by positions verified")
    print("| positions | copy rounds | copy ms | tree rounds | tree ms | tree / copy |\n|---|---|---|---|---|---|")
    for n in sorted({k[1] for k in s}):
        c, tr = s.get((False, n), []), s.get((True, n), [])
        mc = statistics.median(c) if c else float("nan")
        mt = statistics.median(tr) if tr else float("nan")
        print(f"| {n} | {len(c)} | {1e3 * mc:.2f} | {len(tr)} | {1e3 * mt:.2f} | {mt / mc:.3f} |")


if __name__ == "__main__":
    main()
