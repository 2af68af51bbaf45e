"""The learned agent against the best static (E, K), DEL-style and AR, per prompt category.

One process, same prompts for every method. Trains ``trace_q`` agents on the training split's
traces (code, everyday instructions, math word problems, translation) and evaluates them on
held-out prompts, including MT-bench categories no calibration or training prompt comes from.

Trace env: throughput = tokens / cost (AR-step units of the measured cost profile), per
category. Real decoder (``--live N``: the first N held-out prompts of each category): wall-clock
speedup over lede's AR loop, outputs checked identical to greedy AR.

    python benchmarks/agent_vs_static.py                          # trace env, default splits
    python benchmarks/agent_vs_static.py --live 2 --out runs/bench_agent
    python benchmarks/agent_vs_static.py --variants compact/calibrated,full/none --eval-prompts wide
    python benchmarks/agent_vs_static.py --variants compact/calibrated --context-draft 4   # action 0 copies
    python benchmarks/agent_vs_static.py --variants compact/calibrated --context-lengths 1,2,3,4,6,8 --live 2
    python benchmarks/agent_vs_static.py --variants compact/calibrated --context-lengths 1,2,3,4,6,8 \
        --obs-stat-exits 0 --context-span 1 --context-datastore 1 --in-sample   # what the observation can tell
    python benchmarks/agent_vs_static.py --variants full/calibrated --context-lengths 1,2,3,4,6,8 \
        --context-span 1 --context-datastore 1 --more-traces 4    # + 879 prompts' traces, leave-fold-out stores

With context drafts the trace table adds the oracle over the action set without them, and every
table has the best static exit draft (E >= 1, chosen on training traces) beside the best static
overall; the wall-clock table times transformers' prompt lookup (``prompt_lookup_num_tokens=10``)
beside lede's AR loop.

Variants are OBSERVATION/STOP pairs: observation ``compact`` (running acceptance + the shallowest
exit's statistics) or ``full`` (hidden-state context + every exit's statistics, the v0 layout);
stop ``calibrated`` (in-round stop from calibrated draft probabilities) or ``none``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    from agents.evaluate import live_eval, to_markdown, trace_eval, write_results
    from agents.export import export_policy
    from agents.more_traces import fold_envs
    from agents.policies import best_static_action
    from agents.train import greedy_q_policy
    from agents.trace_q import train_trace_q
    from lede_env.env import LEDEEnv
    from lede_env.policies import GuardedPolicy, StaticPolicy
    from lede_env.prompts import (DEFAULT_EVAL, DEFAULT_MAX_NEW, DEFAULT_TRAIN, WIDE_EVAL, first_per_category,
                                  load_prompts, write_prompt_file)

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-prompts", default=DEFAULT_TRAIN)
    ap.add_argument("--eval-prompts", default=DEFAULT_EVAL, help="prompt spec, or 'wide' for WIDE_EVAL")
    ap.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW)
    ap.add_argument("--cost-profile", default="measured")
    ap.add_argument("--head-kind", default="affine-kl",
                    help="exit heads (lede_env.exits.HEAD_KINDS; affine-kl-prev: a round's first draft token also "
                         "reads the previous position's final hidden state)")
    ap.add_argument("--variants", default="compact/calibrated,full/none")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--live", type=int, default=0, help="held-out prompts per category decoded for real")
    ap.add_argument("--context-draft", type=int, default=0,
                    help="context-draft tokens on action 0 (prompt lookup; 0 = plain AR steps)")
    ap.add_argument("--context-lengths", default="",
                    help="copy lengths of the context actions, e.g. 1,2,3,4,6,8 (the agent picks one per round)")
    ap.add_argument("--obs-stat-exits", type=int, default=1,
                    help="compact observation: shallowest exits whose head statistics are observed (0: none, "
                         "no head call per round)")
    ap.add_argument("--context-agreement", type=int, default=0,
                    help="1: the context features also hold the matched n-gram's occurrences and how far their "
                         "continuations agree (lede_env.lookup.match_agreement)")
    ap.add_argument("--context-span", type=int, default=0,
                    help="1: the context features also hold the matched span (lede_env.lookup.match_span)")
    ap.add_argument("--context-datastore", type=int, default=0,
                    help="1: where the context has no match, context drafts come from the model's datastore of its "
                         "own text (lede_env.datastore)")
    ap.add_argument("--no-exits", action="store_true",
                    help="the agent chooses plain steps and context drafts only (trace_q exits=False)")
    ap.add_argument("--horizon", type=int, default=None,
                    help="trace_q targets over this many tokens (the action, then the best static; default: "
                         "trace_q's own)")
    ap.add_argument("--in-sample", action="store_true",
                    help="diagnostic: also train trace_q on the evaluation traces themselves (the most a learner "
                         "with this observation can get out of them; never a result to report as held out)")
    ap.add_argument("--more-traces", type=int, default=0, metavar="FOLDS",
                    help="also train on the datastore's extra text (879 prompts), split into FOLDS parts, each "
                         "traced against a store without its own text (agents.more_traces.fold_envs; needs "
                         "--context-datastore 1; 0: off)")
    ap.add_argument("--more-limit", type=int, default=None, help="with --more-traces: use only this many prompts")
    ap.add_argument("--extra-policies", default="",
                    help="more policy names for both tables (e.g. copy-else:8,2,0.35; see agents.evaluate)")
    ap.add_argument("--out", default="runs/bench_agent")
    args = ap.parse_args()
    eval_prompts = WIDE_EVAL if args.eval_prompts == "wide" else args.eval_prompts
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lengths = tuple(int(x) for x in args.context_lengths.split(",") if x)
    common = dict(max_new_tokens=args.max_new_tokens, cost_profile=args.cost_profile, progress=False,
                  head_kind=args.head_kind,
                  context_draft=args.context_draft, context_lengths=lengths, obs_stat_exits=args.obs_stat_exits,
                  obs_context_agreement=bool(args.context_agreement), obs_context_span=bool(args.context_span),
                  context_datastore=bool(args.context_datastore))
    rows_all, live_all, info = [], [], {}
    for variant in args.variants.split(","):
        obs_kind, stop = variant.split("/")
        kw = dict(common, obs_kind=obs_kind, stop_rule=None if stop == "none" else stop)
        t0 = time.time()
        train_env = LEDEEnv(prompts=args.train_prompts, **kw)
        eval_env = LEDEEnv(prompts=eval_prompts, **kw, reward_lambda=train_env.reward_lambda)
        static_best, static_tp = best_static_action(train_env)
        more = fold_envs(train_env, folds=args.more_traces, limit=args.more_limit) if args.more_traces else []
        if more:
            info[variant] = {"more_traces": sum(len(e.playable) for e in more),
                             "more_tokens": sum(e.trace_set.traces[i].n for e in more for i in e.playable)}
        agent = train_trace_q(train_env, steps=args.steps, exits=not args.no_exits, more_envs=more,
                              **({} if args.horizon is None else {"horizon": args.horizon}))
        policy = greedy_q_policy(agent, train_env.observer.layout())
        E, K = train_env.actions.decode(static_best)
        info[variant] = info.get(variant, {}) | {"lambda": train_env.reward_lambda, "static": [E, K], "static_train_tp": static_tp,
                         "overhead_ar_steps": train_env.profile.overhead / train_env.profile.ar_step,
                         "train_seconds": round(time.time() - t0, 1), "trace_q": agent.info["iterations"][-1]}
        print(f"[{variant}] lambda {train_env.reward_lambda:.3f}, static E={E} K={K}, {info[variant]}", flush=True)
        copies = [f"static:0,{m}" for m in lengths]  # every fixed copy length, for reference
        # the best static exit draft (E >= 1, whole K; LayerSkip's setting), chosen on training traces
        from lede_env.replay import best_static

        train_traces = [train_env.trace_set.traces[i] for i in train_env.playable]
        exit_best, exit_tp = best_static(train_traces, train_env.rules.without_overhead(), train_env.max_new_tokens,
                                         candidates=range(train_env.actions.first_exit_action, train_env.actions.n))
        Ex, Kx = train_env.actions.decode(exit_best)
        info[variant]["static_exit"] = [Ex, Kx, exit_tp]
        exit_name = f"static:{Ex},{Kx}"
        from lede_env.policies import split_policies

        extra = split_policies(args.extra_policies) if args.extra_policies else []
        names = ["ar", "static:best", *copies, exit_name, "del", *extra, "oracle"]
        policies = {f"trace_q ({variant})": GuardedPolicy(policy, fallback=static_best),
                    f"trace_q unguarded ({variant})": greedy_q_policy(agent, train_env.observer.layout())}
        if args.in_sample:
            for steps, hidden in ((args.steps, (64, 64)), (4 * args.steps, (256, 256))):
                fitted = train_trace_q(eval_env, steps=steps, hidden=hidden,
                                       **({} if args.horizon is None else {"horizon": args.horizon}))
                policies[f"trace_q fitted in-sample, {hidden[0]}x{hidden[1]}, {steps} steps ({variant})"] = \
                    greedy_q_policy(fitted, eval_env.observer.layout())
        if stop != "none":
            policies[f"static best + {stop} stop"] = StaticPolicy(static_best, stop_rule=eval_env.rules.stop)
            # the best static (E, K cap) when every round follows the stop rule, chosen on training traces
            capped, capped_tp = best_static(train_traces, train_env.rules.without_overhead(),
                                            train_env.max_new_tokens)
            Ec, Kc = train_env.actions.decode(capped)
            info[variant]["static_with_stop"] = [Ec, Kc, capped_tp]
            policies[f"static best with {stop} stop (E={Ec}, K<={Kc})"] = StaticPolicy(capped,
                                                                                      stop_rule=eval_env.rules.stop)
        rows = trace_eval(eval_env, names, static_best, policies=policies)
        if lengths or args.context_draft:  # the oracle over the action set without context drafts, beside
            plain = LEDEEnv(prompts=eval_prompts, **dict(kw, context_draft=0, context_lengths=(), context_datastore=False),
                            reward_lambda=train_env.reward_lambda)
            for r in trace_eval(plain, ["oracle"], None, by_category=True):
                rows.append(r | {"policy": "oracle without context drafts"})
        for r in rows:
            r["variant"] = variant
        rows_all += rows
        print(to_markdown([{k: r[k] for k in ("variant", "policy", "category", "throughput", "oracle_share",
                                              "tokens_per_round", "acceptance")} for r in rows]), flush=True)
        if args.live:
            folder = export_policy(agent, train_env, out / f"policy-{obs_kind}-{stop}", algo_name="trace_q")
            subset = write_prompt_file(first_per_category(load_prompts(eval_prompts), args.live), out / "live_prompts.jsonl")
            live_env = LEDEEnv(prompts=subset, **kw,
                               reward_lambda=train_env.reward_lambda)
            dec = live_env.make_decoder()
            fixed = [c for c in copies if c.endswith((",3", ",4"))]
            rows = live_eval(live_env, dec, ["ar", "hf", "hf-lookup:10", "static:best", *fixed, exit_name, "del", *extra,
                                             f"agent:{folder}",
                                             f"agent-unguarded:{folder}", "oracle"], static_best, progress=False)
            for r in rows:
                r["variant"] = variant
            live_all += rows
            print(to_markdown([{k: r[k] for k in ("variant", "policy", "category", "tokens_per_s", "speedup_vs_ar",
                                                  "tokens_per_round", "acceptance", "identical_to_ar",
                                                  "policy_ms_per_round")} for r in rows]), flush=True)
    write_results(out, "trace_eval", rows_all)
    if live_all:
        write_results(out, "live_eval", live_all)
    (out / "info.json").write_text(json.dumps(info, indent=2))
    print(f"results in {out}/")


if __name__ == "__main__":
    main()
