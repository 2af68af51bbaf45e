"""Which reward mode and discount make the offline agent's throughput best?

For each (reward mode, discount) pair: collect the same behaviour mixture (same seed) on the
training traces, train the same offline algorithm, and measure the greedy policy's throughput
(total tokens / total cost, AR-step units) on held-out traces, next to the best static (E, K)
chosen on the training traces and the oracle. All in one process, trace env only.

    python benchmarks/reward_modes.py --out runs/bench/reward_modes.md
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-prompts", default="humaneval[0:24]")
    ap.add_argument("--eval-prompts", default="humaneval[24:40]")
    ap.add_argument("--calib-prompts", default="humaneval[100:132]")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--algo", default="discrete_cql")
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--episodes", type=int, default=300)
    ap.add_argument("--grid", default="net:0.5,net:0.9,net:0.99,ratio:0.0,ratio:0.5",
                    help="comma-separated MODE:GAMMA pairs")
    ap.add_argument("--out", type=Path, default=Path("runs/bench/reward_modes.md"))
    args = ap.parse_args()

    os.environ.setdefault("MINARI_DATASETS_PATH", tempfile.mkdtemp(prefix="lede-minari-"))
    from agents.collect import CollectConfig, collect
    from agents.evaluate import to_markdown
    from agents.evaluate import policy_throughput
    from agents.policies import best_static_action
    from lede_env.policies import StaticPolicy
    from agents.train import TrainConfig, greedy_q_policy, train
    from lede_env.env import LEDEEnv
    from lede_env.replay import oracle_plan, rollout, throughput

    common = dict(max_new_tokens=args.max_new_tokens, calib_prompts=args.calib_prompts, cost_profile="measured")
    rows = []
    for i, item in enumerate(args.grid.split(",")):
        mode, gamma = item.split(":")
        tenv = LEDEEnv(prompts=args.train_prompts, reward_mode=mode, **common)
        eenv = LEDEEnv(prompts=args.eval_prompts, reward_mode=mode, **common)
        ds = collect(tenv, CollectConfig(dataset_id=f"lede/bench/rm{i}-{mode}-v0", episodes=args.episodes, seed=0),
                     progress=False)
        algo, layout = train(TrainConfig(dataset_id=ds.spec.dataset_id, algo=args.algo, steps=args.steps,
                                         gamma=float(gamma), out_dir=tempfile.mkdtemp(prefix="lede-train-"),
                                         wandb="disabled"), progress=False, dataset=ds)
        static, _ = best_static_action(tenv)
        tr = [eenv.trace_set.traces[j] for j in eenv.playable]
        oracle = throughput([rollout(t, eenv.rules, eenv.max_new_tokens,
                                     lambda g, p=oracle_plan(t, eenv.rules, eenv.max_new_tokens)[0]: int(p[g]))
                             for t in tr])
        agent = policy_throughput(eenv, greedy_q_policy(algo, layout))
        st = policy_throughput(eenv, StaticPolicy(static))
        rows.append({"reward": mode, "gamma": float(gamma), "agent_throughput": agent, "static_throughput": st,
                     "oracle_throughput": oracle, "agent_vs_static": agent / st, "agent_oracle_share": agent / oracle})
        print(json.dumps(rows[-1]), flush=True)
    md = to_markdown(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(f"# Reward mode and discount\n\n{vars(args)}\n\n{md}\n")
    print(md)


if __name__ == "__main__":
    main()
