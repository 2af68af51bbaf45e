"""Does the cost profile predict wall clock? Isolated against in-loop profiles, per policy.

The trace env, λ, DEL's estimates, the oracle and every trained agent judge a round by the cost
profile. This benchmark decodes held-out prompts for real with several policies (methods
interleaved prompt by prompt, one process) and compares, for each policy, its measured time
relative to lede's AR loop with the time each profile predicts for the same rounds (the sum of
:meth:`~lede_env.costs.CostProfile.round_cost` over the rounds it played, the policy's own time
left out):

- ``isolated``: each layer, the LM head and the draft head timed alone
  (``cost_profile="isolated"``);
- ``in-loop``: those times fitted to rounds of the real loop (``cost_profile="measured"``,
  :mod:`lede_env.loop_profile`; timed on calibration prompts, none of the ones decoded here).

A faithful profile predicts each policy's time ratio to AR; an optimistic one predicts exit
drafts cheaper than they run (ratio below the measured one).

    python benchmarks/profile_fidelity.py --out runs/bench/profile_fidelity.md
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", default=None, help="prompt spec (default: lede_env.prompts.DEFAULT_EVAL + context)")
    ap.add_argument("--per-category", type=int, default=1, help="prompts per category")
    ap.add_argument("--methods", default="ar;ar+ctx4;static:2,1;static:2,2;static:4,1;static:6,2;static:2,1+ctx4;del+ctx4",
                    help="lede methods: POLICY or POLICY+ctxN, separated by ';' (the first is the reference)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--out", type=Path, default=Path("runs/bench/profile_fidelity.md"))
    args = ap.parse_args()

    from agents.evaluate import to_markdown
    from lede_env.loop_profile import get_profile
    from lede_env.generate import Lede
    from lede_env.kernels import cpu_name
    from lede_env.mdp import ObservationConfig
    from lede_env.prompts import DEFAULT_EVAL, first_per_category, load_prompts
    from lede_env.continuations import encode_prompts

    methods = [m.strip() for m in args.methods.split(";") if m.strip()]
    ledes = {}
    for m in methods:
        policy, _, ctx = m.partition("+ctx")
        ledes[m] = Lede(None, policy=policy, context_draft=int(ctx or 0), cost_profile="measured")
    first = ledes[methods[0]]
    b, heads, k_max = first.bundle, first.heads, first.decoder.actions.k_max
    profiles = {kind: get_profile(kind, b, heads, k_max, ObservationConfig()) for kind in ("isolated", "measured")}
    prompts = first_per_category(load_prompts(args.prompts or DEFAULT_EVAL + "+context"), args.per_category)
    encoded = encode_prompts(b, prompts, args.max_new_tokens)
    for lede in ledes.values():
        lede.generate(input_ids=torch.tensor(encoded[0]), max_new_tokens=4)  # warm-up
    secs, cost, same = defaultdict(float), defaultdict(float), defaultdict(lambda: True)
    for ids in encoded:
        ref = None
        for m, lede in ledes.items():
            out = lede.generate(input_ids=torch.tensor(ids), max_new_tokens=args.max_new_tokens)
            ref = out.tokens if ref is None else ref
            same[m] &= out.tokens == ref
            r = out.result
            secs[m] += r.seconds - r.prefill_seconds - sum(x.policy_seconds for x in r.rounds)
            for kind, p in profiles.items():
                ov = p.overhead / p.ar_step
                cost[(m, kind)] += sum(p.round_cost(x.exit_layer, x.draft_len, x.n_verify, passes=x.passes) - ov
                                       for x in r.rounds)
    ref_m = methods[0]
    rows = []
    for m in methods:
        row = {"method": m, "measured time / AR": secs[m] / secs[ref_m]}
        for kind in profiles:
            pred = cost[(m, kind)] / cost[(ref_m, kind)]
            row[f"{'in-loop' if kind == 'measured' else kind} predicts"] = pred
            row[f"{'in-loop' if kind == 'measured' else kind} error %"] = 100 * (pred / row["measured time / AR"] - 1)
        row["identical"] = same[m]
        rows.append(row)
    md = to_markdown(rows)
    fit = profiles["measured"].meta
    head = (f"# Cost-profile fidelity: wall clock on {cpu_name()}, {torch.get_num_threads()} threads, kernels "
            f"{b.stack.kernels_tag}\n\n`{json.dumps(vars(args), default=str)}`\n\n"
            f"prompts: {len(prompts)}; in-loop fit on {fit.get('rounds')} calibration rounds, median error "
            f"{100 * fit.get('median_rel_error', float('nan')):.1f} % (isolated profile on the same rounds: "
            f"{100 * fit.get('prior_median_rel_error', float('nan')):.1f} %)\n\n"
            "Times leave out prefill and the policy's own time; ratios are to the first method.\n\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(head + md + "\n")
    print(head + md)


if __name__ == "__main__":
    main()
