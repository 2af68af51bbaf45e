"""Context drafts (prompt lookup) against transformers' prompt lookup and lede's other drafters.

Wall clock in one process, methods interleaved prompt by prompt, all greedy:

- ``transformers generate``: ``model.generate(do_sample=False)``;
- ``transformers prompt lookup N``: the same with ``prompt_lookup_num_tokens=N`` (transformers'
  prompt lookup decoding: up to N copied tokens per step, verified by the full model);
- ``lede AR``: lede's loop, one full-model step per token (the reference for speedups);
- ``lede <policy> +ctxN``: lede with context drafts of up to N tokens on its plain steps
  (:mod:`lede_env.lookup`), e.g. ``ar+ctx4`` (prompt lookup alone), ``static:2,1+ctx4``.

Reported per category and overall: tokens/s, speedup over lede AR and over transformers'
``generate``, tokens per round (:mod:`lede_env.metrics`: the prefill's token is no round's), and
whether every output equals transformers' greedy tokens. Prompts: the held-out ``WIDE_EVAL``
categories (a few per category) and the packaged context-heavy prompts (``context``: summaries,
answers over a passage, code edits).

    python benchmarks/context_draft.py --out runs/bench/context_draft.md
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", default=None, help="prompt spec (default: WIDE_EVAL + context)")
    ap.add_argument("--per-category", type=int, default=2, help="prompts per category")
    ap.add_argument("--methods", default="ar;ar+ctx4;ar+ctx8;static:2,1;static:2,1+ctx4;del+ctx4",
                    help="lede methods: POLICY or POLICY+ctxN, separated by ';'")
    ap.add_argument("--hf-lookup", default="4,10", help="transformers prompt_lookup_num_tokens values")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--out", type=Path, default=Path("runs/bench/context_draft.md"))
    args = ap.parse_args()

    from agents.evaluate import to_markdown
    from lede_env.generate import Lede
    from lede_env.kernels import cpu_name
    from lede_env.metrics import RoundTotals, tokens_per_second
    from lede_env.prompts import WIDE_EVAL, first_per_category, load_prompts
    from lede_env.continuations import encode_prompts
    from lede_env.model import get_bundle

    b = get_bundle(None)
    prompts = first_per_category(load_prompts(args.prompts or WIDE_EVAL + "+context"), args.per_category)
    encoded = encode_prompts(b, prompts, args.max_new_tokens)
    ledes = {}
    for m in (x.strip() for x in args.methods.split(";") if x.strip()):
        policy, _, ctx = m.partition("+ctx")
        ledes[m] = Lede(None, policy=policy, context_draft=int(ctx or 0))
    hf = {"transformers generate": {}} | {f"transformers prompt lookup {n}": {"prompt_lookup_num_tokens": int(n)}
                                          for n in args.hf_lookup.split(",") if n}
    secs, toks, same = defaultdict(float), defaultdict(int), defaultdict(lambda: True)
    rounds = defaultdict(RoundTotals)

    def run_hf(x, kw):
        t0 = time.perf_counter()
        out = b.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=args.max_new_tokens,
                               do_sample=False, pad_token_id=b.eos_ids[0], **kw)[0, x.shape[1]:].tolist()
        return time.perf_counter() - t0, out

    x0 = torch.tensor(encoded[0]).view(1, -1)
    for kw in hf.values():
        run_hf(x0, kw)  # warm-up
    for lede in ledes.values():
        lede.generate(input_ids=torch.tensor(encoded[0]), max_new_tokens=4)
    for p, ids in zip(prompts, encoded):
        x = torch.tensor(ids).view(1, -1)
        ref = None
        for name, kw in hf.items():
            s, out = run_hf(x, kw)
            ref = out if ref is None else ref
            for cat in (p.category, "all"):
                secs[(name, cat)] += s
                toks[(name, cat)] += len(out)
            same[name] &= out == ref
        for name, lede in ledes.items():
            out = lede.generate(input_ids=torch.tensor(ids), max_new_tokens=args.max_new_tokens)
            label = f"lede {name}"
            for cat in (p.category, "all"):
                secs[(label, cat)] += out.result.seconds
                toks[(label, cat)] += len(out.tokens)
                rounds[(label, cat)] += out.result.totals
            same[label] &= out.tokens == ref
    cats = sorted({c for _, c in secs if c != "all"}) + ["all"]

    def tps(m, c):
        return tokens_per_second(toks[(m, c)], secs[(m, c)])

    rows = []
    for m in dict.fromkeys(m for m, _ in secs):
        row = {"method": m}
        for c in cats:
            row[f"{c} vs AR"] = tps(m, c) / tps("lede ar", c) if ("lede ar", c) in secs else float("nan")
        row["all tok/s"] = tps(m, "all")
        row["vs transformers"] = tps(m, "all") / tps("transformers generate", "all")
        row["tokens/round"] = rounds[(m, "all")].tokens_per_round  # NaN (-) for transformers: rounds unseen
        row["identical"] = same[m]
        rows.append(row)
    md = to_markdown(rows)
    head = (f"# Context drafts: wall clock on {cpu_name()}, {torch.get_num_threads()} threads, kernels "
            f"{b.stack.kernels_tag}\n\n`{json.dumps(vars(args), default=str)}`\n\n"
            f"prompts: {len(prompts)} ({', '.join(f'{c}' for c in cats[:-1])})\n\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(head + md + "\n")
    print(head + md)


if __name__ == "__main__":
    main()
