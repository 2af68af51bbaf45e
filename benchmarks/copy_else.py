"""The copy-else rule against the best static action on the wall clock, repeated and paired.

``copy-else:M,E,THRESHOLD`` (:class:`lede_env.policies.CopyElseDraftPolicy`) copies where the
context or the datastore has a draft and drafts one exit-E token elsewhere. One process; per
repeat, every method runs on every held-out prompt, interleaved prompt by prompt (``lede
evaluate``'s harness, outputs checked identical to AR); the repeats then give the spread of each
ratio. With ``--head-kind affine-kl-prev`` the exit draft reads the previous position's final
hidden state (:mod:`lede_env.exits`).

    python benchmarks/copy_else.py --head-kind affine-kl-prev --per-category 2 --repeats 2
"""

from __future__ import annotations

import argparse
import statistics


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--head-kind", default="affine-kl-prev")
    ap.add_argument("--per-category", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--policies", default="static:best,copy-else:8,2,0.2,copy-else:8,2,0.35")
    args = ap.parse_args()
    import warnings
    from pathlib import Path
    from tempfile import TemporaryDirectory

    from agents.evaluate import live_eval, to_markdown, trace_eval
    from lede_env.config import studied_task
    from agents.policies import best_static_action
    from lede_env.env import LEDEEnv
    from lede_env.policies import split_policies
    from lede_env.prompts import DEFAULT_EVAL, DEFAULT_TRAIN, first_per_category, load_prompts, write_prompt_file

    demo = studied_task(head_kind=args.head_kind)  # the demo's env: copies of 1-8 tokens, datastore, compact
    names = split_policies(args.policies)
    with warnings.catch_warnings(), TemporaryDirectory() as tmp:
        warnings.simplefilter("ignore")
        train = LEDEEnv(demo.replace(prompts=DEFAULT_TRAIN), progress=False)
        static = best_static_action(train)[0]
        held = LEDEEnv(demo.replace(prompts=DEFAULT_EVAL, reward_lambda=train.reward_lambda), progress=False)
        trace_rows = trace_eval(held, ["ar", *names, "oracle"], static, by_category=False)
        subset = write_prompt_file(first_per_category(load_prompts(DEFAULT_EVAL), args.per_category),
                                   Path(tmp) / "prompts.jsonl")
        env = LEDEEnv(demo.replace(prompts=str(subset), reward_lambda=train.reward_lambda), progress=False)
        dec = env.make_decoder()
        runs = [live_eval(env, dec, ["ar", *names, "oracle"], static, progress=False, warmup=r == 0)
                for r in range(args.repeats)]
    print(f"Trace env, held out ({args.head_kind} heads):\n")
    print(to_markdown([{k: r[k] for k in ("policy", "throughput", "tokens_per_round")} for r in trace_rows]))
    rows = []
    for i, r0 in enumerate(runs[0]):
        sp = [run[i]["speedup_vs_ar"] for run in runs]
        rows.append({"policy": r0["policy"], "category": r0["category"],
                     "speedup vs AR, per repeat": " / ".join(f"{x:.3f}" for x in sp),
                     "mean": round(statistics.fmean(sp), 3),
                     "identical to AR": all(run[i]["identical_to_ar"] for run in runs),
                     "policy ms per round": round(statistics.fmean(run[i]["policy_ms_per_round"] for run in runs), 3)})
    print(f"\nWall clock, {args.per_category} held-out prompts per category, {args.repeats} repeats:\n")
    print(to_markdown(rows))


if __name__ == "__main__":
    main()
