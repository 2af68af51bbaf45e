"""Predicted against measured round cost, per action, for the policies of one run.

The trace env charges each round the cost profile's prediction (AR-step units); the real decoder
spends wall-clock seconds. When a policy wins in the trace env and not on the wall clock, the
difference is in the rounds it plays: this script decodes the same held-out prompts with each
policy (interleaved prompt by prompt, one process), groups the rounds by action and prints, per
group, the rounds' mean predicted cost and their mean and median measured time in AR steps
(round seconds over the AR loop's median round on the same prompts: a machine stall must not set
the unit), the policy's own time per round, and the group's excess of measured over predicted
cost spread over all of the policy's rounds (the groups' excesses add up to the ``all`` row's).

    python benchmarks/round_costs.py --agent runs/bench_agent_final2/policy-compact-calibrated \\
        --context-lengths 1,2,3,4,6,8 --obs-stat-exits 0 --per-category 2
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np


def main() -> None:
    from agents.evaluate import live_eval, to_markdown, write_results
    from lede_env.metrics import tokens_per_round
    from lede_env.env import LEDEEnv
    from lede_env.prompts import DEFAULT_EVAL, DEFAULT_MAX_NEW, first_per_category, load_prompts, write_prompt_file

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--agent", required=True, help="an exported agent folder (policy.json + policy.pt)")
    ap.add_argument("--eval-prompts", default=DEFAULT_EVAL)
    ap.add_argument("--per-category", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW)
    ap.add_argument("--context-lengths", default=None, help="(default: the agent's; another is an error)")
    ap.add_argument("--obs-stat-exits", type=int, default=None, help="(default: the agent's; another is an error)")
    ap.add_argument("--policies", default="static:0,4;static:0,3",
                    help="';'-separated policies beside ar, the agent and the bare agent")
    ap.add_argument("--repeat", type=int, default=1, help="decode the prompt set this many times")
    ap.add_argument("--out", default="runs/round_costs")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from lede_env.task import settings_for

    given = {}
    if args.context_lengths is not None:
        given["context_lengths"] = [x for x in args.context_lengths.split(",") if x]
    if args.obs_stat_exits is not None:
        given["obs_stat_exits"] = args.obs_stat_exits
    names = ["ar", *[p for p in args.policies.split(";") if p], f"agent:{args.agent}", f"agent-unguarded:{args.agent}"]
    # every setting of the agent's env (measured costs for an agent exported before they were recorded)
    task = settings_for(names, given, {"cost_profile": "measured"})
    subset = write_prompt_file(first_per_category(load_prompts(args.eval_prompts), args.per_category),
                               out / "prompts.jsonl")
    env = LEDEEnv(prompts=str(subset), max_new_tokens=args.max_new_tokens, progress=False, **task)
    dec = env.make_decoder()
    records: dict = {}
    rows = []
    for _ in range(args.repeat):
        rows += live_eval(env, dec, names, progress=True, by_category=False, records=records)
    ar_rounds = [r for g in records["ar"] for r in g["rounds"]]
    # the median AR round: a stall of the machine (seconds, now and then) must not set the unit
    ar_step = float(np.median([r["seconds"] for r in ar_rounds]))
    acts = env.actions
    table = []
    for pol, gens in records.items():
        groups = defaultdict(lambda: defaultdict(float))
        secs = defaultdict(list)
        for g in gens:
            for r in g["rounds"]:
                E, K = acts.decode(r["action"])
                key = "AR" if r["action"] == 0 else (f"copy<={K}" if E == 0 else f"E={E}")
                for k in (key, "all"):
                    s = groups[k]
                    s["rounds"] += 1
                    s["tokens"] += r["emitted"]
                    s["predicted"] += r["cost"]
                    s["measured"] += r["seconds"] / ar_step
                    s["policy"] += r["policy_seconds"] / ar_step
                    secs[k].append(r["seconds"] / ar_step)
        total = groups["all"]["rounds"]
        for key, s in sorted(groups.items(), key=lambda kv: (kv[0] != "all", kv[0])):
            n = s["rounds"]
            table.append({"policy": pol, "action": key, "rounds": int(n),
                          "tokens_per_round": tokens_per_round(s["tokens"], n),
                          "predicted_cost": s["predicted"] / n, "measured_cost": s["measured"] / n,
                          "median_measured_cost": float(np.median(secs[key])),
                          "policy_cost": s["policy"] / n, "measured/predicted": s["measured"] / s["predicted"],
                          # this group's excess of measured over predicted cost, per round of the whole run
                          "excess_per_round": (s["measured"] - s["predicted"]) / total})
    print(to_markdown([r for r in rows if r["category"] == "all"]))
    print(f"\nAR step {1000 * ar_step:.2f} ms (measured, median of the AR loop's rounds)\n")
    print(to_markdown(table))
    write_results(out, "round_costs", table)
    (out / "records.json").write_text(json.dumps(records))
    write_results(out, "live", rows)


if __name__ == "__main__":
    main()
