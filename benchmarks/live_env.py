"""The live backend on the embedded model: steps per second of each backend, and how an agent
trained on greedy traces fares under sampling.

1. Steps/s: ``LEDE-Llama3-v0`` (trace) vs ``LEDE-Llama3-Live-v0`` (greedy; sampled at
   ``--temperature``; sampled with wall-clock costs), a static (E, K) policy on ``--prompts``.
2. Under sampling at ``--temperature``, per held-out prompt (methods interleaved, seeded per
   prompt): lede's own loop with always-AR (sampled AR, the reference), a static (E, K) and the
   exported agent (``runs/demo/policy``, else ``runs/quickstart/policy``; skipped if neither
   exists), and transformers' sampled ``model.generate``: tokens/s, speedup vs sampled AR
   (tokens/s ratio: sampled outputs differ in length), tokens per round, acceptance; and the
   same policies' throughput in the live env at that temperature (tokens per AR-step cost,
   cost profile and wall clock).

    python benchmarks/live_env.py --out runs/bench/live_env.md
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def steps_per_second(env, action: int, repeats: int) -> dict:
    u = env.unwrapped
    steps = tokens = 0
    t0 = time.perf_counter()
    for _ in range(repeats):
        for i in u.playable:
            u.reset(seed=i, options={"prompt_index": i})
            done = False
            while not done:
                _, _, te, tr, info = u.step(action)
                steps += 1
                done = te or tr
            tokens += info["tokens_generated"]
    s = time.perf_counter() - t0
    return {"steps": steps, "seconds": s, "steps_per_s": steps / s, "tokens_per_s": tokens / s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", default="humaneval[0:4]", help="prompts of the steps/s measurement")
    ap.add_argument("--eval-prompts", default="humaneval[24:32]", help="held-out prompts of the sampling comparison")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--static", default="2,1", help="E,K of the static policy")
    ap.add_argument("--trace-repeats", type=int, default=20, help="passes over the prompts for the trace env")
    ap.add_argument("--agent", default=None, help="exported agent folder (default: runs/demo/policy, else "
                                                  "runs/quickstart/policy)")
    ap.add_argument("--out", type=Path, default=Path("runs/bench/live_env.md"))
    ap.add_argument("--device", default=None, help="cpu, cuda, cuda:N or auto (default: $LEDE_DEVICE, else cpu)")
    ap.add_argument("--dtype", default=None, help="fp32, bf16 or fp16 (default: bf16 on CUDA, fp32 on CPU)")
    args = ap.parse_args()
    from lede_env.device import set_default_device, synchronize

    set_default_device(args.device, args.dtype)

    import gymnasium as gym

    import lede_env  # noqa: F401 - registers the envs
    from agents.evaluate import to_markdown
    from lede_env.policies import policy_from_name
    from lede_env.generate import Lede
    from lede_env.metrics import RoundTotals, speedup, tokens_per_second
    from lede_env.prompts import load_prompts
    from lede_env.continuations import encode_prompts
    from lede_env.model import get_bundle

    E, K = (int(x) for x in args.static.split(","))
    base = dict(prompts=args.prompts, max_new_tokens=args.max_new_tokens, progress=False)
    # ---- 1. steps per second ------------------------------------------------------------------
    rows1 = []
    for name, env_id, kw, reps in (
            ("trace (greedy)", "LEDE-Llama3-v0", {}, args.trace_repeats),
            ("live, greedy", "LEDE-Llama3-Live-v0", {}, 1),
            (f"live, T={args.temperature}", "LEDE-Llama3-Live-v0", {"temperature": args.temperature}, 1),
            (f"live, T={args.temperature}, wall-clock cost", "LEDE-Llama3-Live-v0",
             {"temperature": args.temperature, "cost": "wallclock"}, 1)):
        env = gym.make(env_id, **base, **kw)
        a = env.unwrapped.actions.encode(E, K)
        steps_per_second(env, a, 1 if reps > 1 else 0)  # warm-up (trace env: caches)
        rows1.append({"backend": name} | steps_per_second(env, a, reps))
        env.close()
    md1 = to_markdown(rows1)
    print(md1)

    # ---- 2. an agent trained on greedy traces, under sampling -----------------------------------
    candidates = [args.agent] if args.agent else ["runs/demo/policy", "runs/quickstart/policy"]
    agent = next((p for p in candidates if Path(p, "policy.json").exists()), None)
    if agent is None:
        print(f"No exported agent ({' or '.join(candidates)}): skipping the sampling comparison; "
              "run `lede demo` first.")
        md2 = md3 = "(skipped: no exported agent)"
    else:
        b = get_bundle(None)
        prompts = encode_prompts(b, load_prompts(args.eval_prompts), args.max_new_tokens)
        lede = Lede(None, policy=agent)
        names = {"sampled AR (lede loop)": "ar", f"static E={E},K={K}": f"static:{E},{K}", f"agent {agent}": agent}
        pols = {n: lede.make_policy(p) for n, p in names.items()}
        stats = {n: {"s": 0.0, "tok": 0, "rounds": RoundTotals()} for n in [*pols, "transformers sampled"]}
        lede.generate(input_ids=torch.tensor(prompts[0]), max_new_tokens=4)  # warm-up
        x0 = torch.tensor(prompts[0]).view(1, -1).to(b.stack.device)
        b.model.generate(x0, attention_mask=torch.ones_like(x0), max_new_tokens=4, do_sample=False)
        for i, ids in enumerate(prompts):
            for n, pol in pols.items():
                out = lede.generate(input_ids=torch.tensor(ids), policy=pol, max_new_tokens=args.max_new_tokens,
                                    temperature=args.temperature, seed=i)
                s = stats[n]
                s["s"] += out.result.seconds
                s["tok"] += len(out.tokens)
                s["rounds"] += out.result.totals
            x = torch.tensor(ids).view(1, -1).to(b.stack.device)
            torch.manual_seed(i)
            synchronize(b.stack.device)
            t0 = time.perf_counter()
            ref = b.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=args.max_new_tokens,
                                   do_sample=True, temperature=args.temperature, top_p=1.0, top_k=0,
                                   pad_token_id=b.eos_ids[0])[0, x.shape[1]:]
            synchronize(b.stack.device)
            s = stats["transformers sampled"]
            s["s"] += time.perf_counter() - t0
            s["tok"] += int(ref.numel())
            n_rounds = max(int(ref.numel()) - 1, 0)  # plain sampling: one round a token after the prefill's
            s["rounds"] += RoundTotals(rounds=n_rounds, tokens=n_rounds)
        ar = stats["sampled AR (lede loop)"]
        rows2 = [{"method": n, "tokens_per_s": tokens_per_second(s["tok"], s["s"]),
                  "speedup_vs_sampled_ar": speedup(s["tok"], s["s"], ar["tok"], ar["s"]),
                  "tokens_per_round": s["rounds"].tokens_per_round,
                  "acceptance": s["rounds"].acceptance} for n, s in stats.items()]
        md2 = to_markdown(rows2)
        print(md2)

        # the same policies in the live env at this temperature: throughput in AR-step units
        rows3 = []
        from lede_env.task import settings_for

        task = settings_for([f"agent:{agent}"])  # every setting of the env the agent was trained in
        for cost in ("profile", "wallclock"):
            env = gym.make("LEDE-Llama3-Live-v0", prompts=args.eval_prompts, max_new_tokens=args.max_new_tokens,
                           temperature=args.temperature, cost=cost, progress=False, **task)
            u = env.unwrapped
            for n, p in names.items():
                pol = policy_from_name("agent:" + p if p == agent else p, u.actions, u.profile, u.rules.bonus,
                                       u.rules.reuse, u.observer)
                tot = RoundTotals()
                with u.playing(pol):
                    for i in u.playable:
                        obs, _ = u.reset(seed=i, options={"prompt_index": i})
                        pol.reset()
                        done = False
                        while not done:
                            obs, r, te, tr, info = u.step(pol.act(obs if pol.needs_observation else None))
                            tot.add(info["round"])
                            done = te or tr
                rows3.append({"cost": cost, "policy": n, "throughput_tokens_per_ar_step": tot.throughput})
            env.close()
        md3 = to_markdown(rows3)
        print(md3)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(f"# The live backend\n\n`{json.dumps(vars(args), default=str)}`\n\n"
                        f"## Steps per second ({args.prompts}, {args.max_new_tokens} tokens, static E={E},K={K})\n\n"
                        f"{md1}\n\n## Under sampling at T={args.temperature} ({args.eval_prompts}): wall clock, "
                        f"lede generate\n\n{md2}\n\n## Same policies in the live env at T={args.temperature} "
                        f"(tokens per AR-step cost; the agent pays its observation overhead)\n\n{md3}\n")


if __name__ == "__main__":
    main()
