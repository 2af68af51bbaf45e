"""Round time by number of verified positions, measured in the real decoding loop.

Decodes prompts with plain AR steps and context drafts of up to ``--copy`` tokens (prompt lookup:
no layers are spent on a draft, so a round is one verify pass of 1 .. copy+1 positions plus the
decoder's own work) and reports, per number of verified positions n, the median round time and
c(n) = that time / the median time of a 1-position round, from the same run.

    python benchmarks/verify_cost.py                       # context prompts + HumanEval, copies <= 8
    python benchmarks/verify_cost.py --copy 4 --prompts "context[0:6]" --repeats 1
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict


def main() -> None:
    from lede_env.generate import Lede
    from lede_env.prompts import load_prompts

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", default="context[0:6]+humaneval[0:4]")
    ap.add_argument("--copy", type=int, default=8, help="most tokens a context draft copies")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    lede = Lede(policy="ar", context_draft=args.copy)
    prompts = load_prompts(args.prompts)
    seconds = defaultdict(list)
    for _ in range(args.repeats):
        for p in prompts:
            r = lede.decoder.generate(lede.encode(p.text), lede.policy, max_new_tokens=args.max_new_tokens)
            for rec in r.rounds[2:]:  # the first rounds after the prefill run on cold caches
                seconds[rec.n_verify].append(rec.seconds)
    if 1 not in seconds:
        raise SystemExit("No 1-position round was timed: use more or longer prompts.")
    base = statistics.median(seconds[1])
    print(f"kernels {lede.bundle.stack.kernels_tag}")
    print("| positions verified | rounds | median ms | c(n) |\n|---|---|---|---|")
    for n in sorted(seconds):
        m = statistics.median(seconds[n])
        print(f"| {n} | {len(seconds[n])} | {m * 1e3:.2f} | {m / base:.3f} |")


if __name__ == "__main__":
    main()
