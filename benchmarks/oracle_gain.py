"""Where the oracle's lead over the best static action lies, round by round.

Along the best static action's own path over held-out traces, each round's one-step improvement
is the best action's target minus the static's (``trace_q``'s target: the action, then the
static action, until 16 tokens past the round's start; tokens - lambda * cost, so every action is
judged over the same stretch of text). Summed per kind of round: what the context (or the
datastore) offers there (a context copy, a datastore draft, nothing) and how the static's own
round went (its first draft token rejected, 1-2 accepted, 3 or more), with the action that
would have done best. A causal policy can only take the improvement of a kind of round it can
tell apart before the round.

    python benchmarks/oracle_gain.py
"""

from __future__ import annotations

import argparse
import warnings
from collections import defaultdict


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--horizon", type=int, default=16)
    ap.add_argument("--head-kind", default="affine-kl")
    args = ap.parse_args()
    import numpy as np

    from agents.evaluate import to_markdown
    from lede_env.config import studied_task
    from agents.policies import best_static_action
    from agents.trace_q import _targets
    from lede_env.env import LEDEEnv
    from lede_env.lookup import context_match
    from lede_env.prompts import DEFAULT_EVAL, DEFAULT_TRAIN
    from lede_env.replay import replay_round, useful_actions

    demo = studied_task(head_kind=args.head_kind)  # the demo's env: copies of 1-8 tokens, datastore, compact
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train = LEDEEnv(demo.replace(prompts=DEFAULT_TRAIN), progress=False)
        held = LEDEEnv(demo.replace(prompts=DEFAULT_EVAL, reward_lambda=train.reward_lambda), progress=False)
    static = best_static_action(train)[0]
    u = held.unwrapped
    allowed = useful_actions(u.rules)
    si = allowed.index(static)
    gain: dict = defaultdict(lambda: [0, 0.0])
    best: dict = defaultdict(lambda: defaultdict(int))
    for idx in u.playable:
        u.reset(options={"prompt_index": idx})
        done = False
        while not done:
            y = _targets(u, u.reward_lambda, allowed, args.horizon, static, True)
            adv = y - y[si]
            seq = np.concatenate([u.trace.prompt, u.trace.generated[:u._g]])
            src = ("context copy" if context_match(seq, 8, u.rules.context_ngram)[1]
                   else "datastore draft" if u.rules.datastore is not None and u.rules.datastore.propose(seq, 8)
                   else "nothing to copy")
            oc = replay_round(u.trace, u._g, static, u.rules, u._limit)[0]
            how = "first token rejected" if oc.accepted == 0 else "1-2 accepted" if oc.accepted <= 2 else "3+ accepted"
            if src == "nothing to copy":
                how = "(an AR step)"
            for key in (("all", ""), (src, how)):
                gain[key][0] += 1
                gain[key][1] += float(adv.max())
            if adv.max() > 0:
                best[(src, how)][str(u.actions.decode(allowed[int(adv.argmax())]))] += 1
            _, _, te, tr, _ = u.step(static)
            done = te or tr
    total = gain[("all", "")][1]
    rows = [{"what the text offers": s, "the static's round": h, "rounds": n,
             "share of rounds": round(n / gain[("all", "")][0], 3), "one-step gain (tokens)": round(g, 1),
             "share of the gain": round(g / total, 3) if total else 0.0,
             "best instead (E, K), most often": ", ".join(f"{a} x{c}" for a, c in
                                                          sorted(best[(s, h)].items(), key=lambda x: -x[1])[:3])}
            for (s, h), (n, g) in sorted(gain.items()) if s != "all"]
    E, K = u.actions.decode(static)
    print(f"Held-out {DEFAULT_EVAL}: the static (E={E}, K={K})'s path, horizon {args.horizon} tokens, "
          f"lambda {u.reward_lambda:.3f}\n")
    print(to_markdown(rows))


if __name__ == "__main__":
    main()
