"""Wall-clock speed of `lede generate` against transformers' `model.generate`, in one process.

For each held-out prompt, methods are interleaved (so machine noise hits them alike):

- ``transformers generate``: ``model.generate`` greedy, and with ``do_sample=True`` at
  ``--temperature`` (the references for the two speedup columns);
- ``lede POLICY``: :meth:`lede_env.generate.Lede.generate` with each policy, greedy and sampled
  (speculative sampling, seeded per prompt).

Reported per method: tokens/s, speedup (ratio of tokens/s to the transformers reference of the
same mode, since sampled outputs differ in length), tokens per round, acceptance, the policy's own time per round, and, for greedy,
whether the tokens equal transformers' greedy output.

    python benchmarks/generate.py --policies static:2,1,runs/demo/policy --out runs/bench/generate.md
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", default="humaneval[24:32]+../shared/data/spec_bench_dev.jsonl[0:160:40]")
    ap.add_argument("--policies", default="static:2,1,del", help="comma-separated lede policies / agent folders")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--out", type=Path, default=Path("runs/bench/generate.md"))
    ap.add_argument("--device", default=None, help="cpu, cuda, cuda:N or auto (default: $LEDE_DEVICE, else cpu)")
    ap.add_argument("--dtype", default=None, help="fp32, bf16 or fp16 (default: bf16 on CUDA, fp32 on CPU)")
    args = ap.parse_args()
    from lede_env.device import set_default_device, synchronize

    set_default_device(args.device, args.dtype)

    from agents.evaluate import to_markdown
    from lede_env.policies import split_policies
    from lede_env.generate import Lede
    from lede_env.metrics import RoundTotals, speedup, tokens_per_second
    from lede_env.prompts import load_prompts
    from lede_env.continuations import encode_prompts
    from lede_env.model import get_bundle

    b = get_bundle(None)
    prompts = encode_prompts(b, load_prompts(args.prompts), args.max_new_tokens)
    policies = split_policies(args.policies)
    ledes = {p: Lede(None, policy=p) for p in policies}
    model = b.model
    stats = {}

    def add(name, mode, seconds, tokens, out=None, same=None):
        """Count one generation; without ``out`` (transformers) one round per token after the prefill's."""
        s = stats.setdefault((name, mode), {"s": 0.0, "tok": 0, "rounds": RoundTotals(), "pol": 0.0, "same": True})
        s["s"] += seconds
        s["tok"] += tokens
        s["rounds"] += out.result.totals if out is not None else RoundTotals(rounds=max(tokens - 1, 0),
                                                                             tokens=max(tokens - 1, 0))
        if out is not None:
            s["pol"] += sum(r.policy_seconds for r in out.result.rounds)
        if same is not None:
            s["same"] &= same

    first = torch.tensor(prompts[0]).view(1, -1)
    model.generate(first, attention_mask=torch.ones_like(first), max_new_tokens=4, do_sample=False)  # warm-up
    for lede in ledes.values():
        lede.generate(input_ids=torch.tensor(prompts[0]), max_new_tokens=4)
    for i, ids in enumerate(prompts):
        x = torch.tensor(ids).view(1, -1).to(b.stack.device)
        for mode in ("greedy", "sampled"):
            kw = dict(do_sample=False) if mode == "greedy" else dict(do_sample=True, temperature=args.temperature,
                                                                      top_p=1.0, top_k=0)
            torch.manual_seed(i)
            synchronize(b.stack.device)
            t0 = time.perf_counter()
            ref = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=args.max_new_tokens,
                                 pad_token_id=b.eos_ids[0], **kw)[0, x.shape[1]:].tolist()
            add("transformers generate", mode, time.perf_counter() - t0, len(ref))  # .tolist() synchronised
            for p, lede in ledes.items():
                out = lede.generate(input_ids=torch.tensor(ids), max_new_tokens=args.max_new_tokens,
                                    temperature=0.0 if mode == "greedy" else args.temperature, seed=i)
                add(f"lede {p}", mode, out.result.seconds, len(out.tokens), out,
                    out.tokens == ref if mode == "greedy" else None)
    rows = []
    for mode in ("greedy", "sampled"):
        ref = stats[("transformers generate", mode)]
        for (name, m), s in stats.items():
            if m != mode:
                continue
            t = s["rounds"]
            rows.append({"method": name, "mode": mode, "tokens_per_s": tokens_per_second(s["tok"], s["s"]),
                         "speedup_vs_transformers": speedup(s["tok"], s["s"], ref["tok"], ref["s"]),
                         "tokens_per_round": t.tokens_per_round, "acceptance": t.acceptance,
                         "policy_ms_per_round": 1000 * s["pol"] / t.rounds if t.rounds else float("nan"),
                         "identical_to_greedy": s["same"] if mode == "greedy" else "-"})
    md = to_markdown(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(f"# lede generate vs transformers generate\n\n`{json.dumps(vars(args), default=str)}`\n\n"
                        f"speedup = tokens/s ratio to transformers generate in the same mode\n\n{md}\n")
    print(md)


if __name__ == "__main__":
    main()
