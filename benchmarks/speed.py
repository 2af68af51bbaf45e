"""Wall-clock speed of self-speculative decoding on the embedded model, in one process.

Methods, all greedy, on held-out prompts (not used for fitting exit heads or choosing statics):

- ``AR``: lede's own loop, one full-model step per token (the reference for speedups);
- ``transformers generate``: ``model.generate(do_sample=False)``;
- ``transformers assistant_early_exit=E``: transformers' static self-speculation (logit lens, its
  own draft-length schedule), at the best E of a small grid, on the first ``--ee-prompts`` prompts
  and ``--ee-tokens`` tokens (it is slow), compared per token;
- ``static lens, no reuse``: the best static (E, K) with logit-lens exits, full vocabulary and
  full-model verification (plain SSD);
- ``static <kind>+vocab<V_d>+reuse``: the best static (E, K) with learned exit heads
  (``--head-kind``, default ``affine-kl``), the truncated draft vocabulary and compute reuse in
  verification, verifying K+1 positions (the verifier's bonus token; the last draft token also
  passes layers 1..E) and, as ``no bonus``, only K positions;
- ``oracle replay`` (and ``no bonus``): the dynamic-programming oracle's action sequence replayed by
  the real decoder.

Statics are chosen on the training traces. For each method the table gives wall-clock tokens/s,
the speedup over AR measured in this run (tokens/s ratio over the same prompts, methods
interleaved prompt by prompt), tokens per round (metrics as :mod:`lede_env.metrics` defines them:
the prefill's token is no round's), and the speedup the trace env
predicts for the same actions (AR cost / method cost under the measured cost profile).

    python benchmarks/speed.py --out runs/bench/speed.md
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", default="humaneval[32:40]+../shared/data/spec_bench_dev.jsonl[0:160:20]",
                    help="held-out prompt spec ('+' joins specs)")
    ap.add_argument("--train-prompts", default="humaneval[0:24]")
    ap.add_argument("--calib-prompts", default="humaneval[100:132]")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--head-kind", default="affine-kl", help="learned exit-head kind (lede_env.exits.HEAD_KINDS)")
    ap.add_argument("--draft-vocab", type=int, default=8192)
    ap.add_argument("--ee-grid", default="4,8,16,24")
    ap.add_argument("--ee-prompts", type=int, default=2)
    ap.add_argument("--ee-tokens", type=int, default=32)
    ap.add_argument("--out", type=Path, default=Path("runs/bench/speed.md"))
    ap.add_argument("--device", default=None, help="cpu, cuda, cuda:N or auto (default: $LEDE_DEVICE, else cpu)")
    ap.add_argument("--dtype", default=None, help="fp32, bf16 or fp16 (default: bf16 on CUDA, fp32 on CPU)")
    args = ap.parse_args()
    from lede_env.device import set_default_device, synchronize

    set_default_device(args.device, args.dtype)

    from agents.evaluate import to_markdown
    from agents.policies import best_static_action
    from lede_env.decoding import PlanPolicy, StaticPolicy, greedy_reference
    from lede_env.env import LEDEEnv
    from lede_env.metrics import speedup, tokens_per_round, tokens_per_second
    from lede_env.replay import oracle_plan, rollout
    from lede_env.calibration import HeadSpec, get_heads
    from lede_env.model import get_bundle

    b = get_bundle(None)
    common = dict(max_new_tokens=args.max_new_tokens, calib_prompts=args.calib_prompts, cost_profile="measured",
                  progress=False)
    learned = dict(head_kind=args.head_kind, draft_vocab=args.draft_vocab, reuse=True)
    variants = {  # name: env arguments
        "lens": dict(head_kind="lens", draft_vocab=None, reuse=False),
        "learned": dict(learned, bonus=True),
        "learned, no bonus": dict(learned, bonus=False),
    }
    envs, decs, statics = {}, {}, {}
    for name, kw in variants.items():
        envs[name] = u = LEDEEnv(prompts=args.prompts, **common, **kw)
        statics[name], _ = best_static_action(LEDEEnv(prompts=args.train_prompts, **common, **kw))
        heads = get_heads(b, HeadSpec(kind=kw["head_kind"], draft_vocab=kw["draft_vocab"],
                                      calib_prompts=args.calib_prompts))
        decs[name] = u.make_decoder(b, heads)
    env = envs["learned"]
    traces = [env.trace_set.traces[i] for i in env.playable]
    plans = {v: {t.id: oracle_plan(t, envs[v].rules.without_overhead(), env.max_new_tokens)[0] for t in traces}
             for v in ("learned", "learned, no bonus")}
    kind = f"{args.head_kind}+vocab{args.draft_vocab}+reuse"
    methods = {  # label: (variant, policy for a trace)
        "AR": ("learned", lambda t: StaticPolicy(0)),
        "static lens, no reuse": ("lens", lambda t: StaticPolicy(statics["lens"])),
        f"static {kind}": ("learned", lambda t: StaticPolicy(statics["learned"])),
        f"static {kind}, no bonus": ("learned, no bonus", lambda t: StaticPolicy(statics["learned, no bonus"])),
        "oracle replay": ("learned", lambda t: PlanPolicy(plans["learned"][t.id])),
        "oracle replay, no bonus": ("learned, no bonus", lambda t: PlanPolicy(plans["learned, no bonus"][t.id])),
    }
    res = {m: {"s": 0.0, "tok": 0, "round_tok": 0, "rounds": 0, "pred_cost": 0.0, "same": True}
           for m in list(methods) + ["hf"]}
    decs["learned"].generate(torch.tensor(traces[0].prompt), StaticPolicy(0), 4)  # warm-up
    for i, t in zip(env.playable, traces):
        p = torch.tensor(t.prompt)
        ref = None
        for m, (var, mk) in methods.items():
            out = decs[var].generate(p, mk(t), args.max_new_tokens)
            r = res[m]
            r["s"] += out.seconds
            r["tok"] += len(out.tokens)
            r["round_tok"] += out.totals.tokens  # the prefill's token is no round's (lede_env.metrics)
            r["rounds"] += len(out.rounds)
            ref = out.tokens if m == "AR" else ref
            r["same"] &= out.tokens == ref
            # what the trace env predicts for the same actions
            u = envs[var]
            acts = iter([rd.action for rd in out.rounds])
            # (none of these methods reads observations, so no feature/policy overhead is charged)
            r["pred_cost"] += rollout(u.trace_set.traces[i], u.rules.without_overhead(), u.max_new_tokens,
                                      lambda g: next(acts, 0))["cost"]
        synchronize(b.stack.device)
        t0 = time.perf_counter()
        hf = greedy_reference(b.model, p, args.max_new_tokens, b.eos_ids)
        synchronize(b.stack.device)
        res["hf"]["s"] += time.perf_counter() - t0
        res["hf"]["tok"] += len(hf)
        res["hf"]["round_tok"] += max(len(hf) - 1, 0)  # one AR round per token after the prefill's
        res["hf"]["rounds"] += max(len(hf) - 1, 0)
        res["hf"]["same"] &= hf == ref
    ar = res["AR"]
    rows = []
    for m in ["AR", "hf"] + list(methods)[1:]:
        r = res[m]
        pred = ar["pred_cost"] / r["pred_cost"] if r["pred_cost"] else float("nan")
        rows.append({"method": "transformers generate" if m == "hf" else m,
                     "tokens_per_s": tokens_per_second(r["tok"], r["s"]),
                     "speedup_vs_ar": speedup(r["tok"], r["s"], ar["tok"], ar["s"]),
                     "tokens_per_round": tokens_per_round(r["round_tok"], r["rounds"]),
                     "predicted_speedup": pred if m != "hf" else float("nan"), "identical_to_ar": r["same"]})
    # transformers' assistant_early_exit: slow, so a few prompts and tokens, per-token comparison
    def early_exit(t, E):
        """(seconds, tokens) of transformers' static self-speculation at exit E on trace t's prompt."""
        ids = torch.tensor(t.prompt).view(1, -1).to(b.stack.device)
        synchronize(b.stack.device)
        t0 = time.perf_counter()
        out = b.model.generate(ids, attention_mask=torch.ones_like(ids), assistant_early_exit=E, do_sample=False,
                               max_new_tokens=args.ee_tokens, pad_token_id=b.eos_ids[0])
        synchronize(b.stack.device)
        return time.perf_counter() - t0, out.shape[1] - ids.shape[1]

    sub = traces[: args.ee_prompts]
    grid = {E: early_exit(sub[0], E) for E in (int(x) for x in args.ee_grid.split(","))}
    E = max(grid, key=lambda e: grid[e][1] / grid[e][0])
    s_ee = s_ar = tok_ee = tok_ar = 0
    for t in sub:
        s, n = early_exit(t, E)
        s_ee += s
        tok_ee += n
        o = decs["learned"].generate(torch.tensor(t.prompt), StaticPolicy(0), args.ee_tokens)
        s_ar += o.seconds
        tok_ar += len(o.tokens)
    rows.append({"method": f"transformers assistant_early_exit={E}", "tokens_per_s": tokens_per_second(tok_ee, s_ee),
                 "speedup_vs_ar": speedup(tok_ee, s_ee, tok_ar, s_ar), "tokens_per_round": float("nan"),
                 "predicted_speedup": float("nan"), "identical_to_ar": None})
    md = to_markdown(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    static_desc = {k: envs[k].actions.decode(v) for k, v in statics.items()}
    args.out.write_text(f"# Speed benchmark\n\n`{json.dumps(vars(args), default=str)}`\n\n"
                        f"static choices (E, K): {static_desc}\n\n{md}\n")
    print(f"static choices (E, K): {static_desc}")
    print(md)


if __name__ == "__main__":
    main()
