"""Wall-clock effect of the CPU kernel choice on AR and self-speculative decoding, in one process.

For each held-out prompt (a few per category) the methods run interleaved, each under every
kernel choice (``--kernels``, default ``blas`` = the previous default, and ``auto`` = the table
measured on this machine, see :mod:`lede_env.kernels`), so machine noise hits them alike:

- ``transformers generate``: ``model.generate(do_sample=False)`` (torch's own kernels);
- ``lede AR``: lede's loop, one full-model step per token;
- ``lede static:E,K``: static self-speculative decoding with the default exit heads.

Reported per category and overall: tokens/s, speedup over ``transformers generate`` and over
lede AR with the first kernel choice (ratios of total times over the same prompts), and whether
every output equals transformers' greedy tokens.

    python benchmarks/kernel_choices.py --out runs/bench/kernels.md
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
    ap.add_argument("--prompts", default=None, help="prompt spec (default: lede_env.prompts.DEFAULT_EVAL)")
    ap.add_argument("--per-category", type=int, default=2, help="prompts per category")
    ap.add_argument("--kernels", default="blas,auto", help="kernel choices, comma-separated (the first is the reference)")
    ap.add_argument("--policies", default="ar,static:2,1,static:2,2,static:4,2",
                    help="lede policies (ar = one full-model step per token)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--out", type=Path, default=Path("runs/bench/kernels.md"))
    args = ap.parse_args()

    from agents.evaluate import to_markdown
    from lede_env.generate import Lede
    from lede_env.kernels import cpu_name
    from lede_env.policies import split_policies
    from lede_env.prompts import DEFAULT_EVAL, first_per_category, load_prompts
    from lede_env.continuations import encode_prompts
    from lede_env.model import get_bundle

    b = get_bundle(None)
    prompts = first_per_category(load_prompts(args.prompts or DEFAULT_EVAL), args.per_category)
    encoded = encode_prompts(b, prompts, args.max_new_tokens)
    kernels = args.kernels.split(",")
    ledes = {p: Lede(None, policy=p) for p in split_policies(args.policies)}
    tables = {}
    for k in kernels:
        b.stack.set_kernels(k)
        tables[k] = b.stack.kernels_tag
    secs, toks, same = defaultdict(float), defaultdict(int), defaultdict(lambda: True)

    def timed_hf(x):
        t0 = time.perf_counter()
        out = b.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=args.max_new_tokens,
                               do_sample=False, pad_token_id=b.eos_ids[0])[0, x.shape[1]:].tolist()
        return time.perf_counter() - t0, out

    timed_hf(torch.tensor(encoded[0]).view(1, -1))  # warm-up
    for k in kernels:
        b.stack.set_kernels(k)
        for lede in ledes.values():
            lede.generate(input_ids=torch.tensor(encoded[0]), max_new_tokens=4)
    for p, ids in zip(prompts, encoded):
        x = torch.tensor(ids).view(1, -1)
        s, ref = timed_hf(x)
        for cat in (p.category, "all"):
            secs[("transformers generate", cat)] += s
            toks[("transformers generate", cat)] += len(ref)
        for k in kernels:
            b.stack.set_kernels(k)
            for name, lede in ledes.items():
                out = lede.generate(input_ids=torch.tensor(ids), max_new_tokens=args.max_new_tokens)
                label = f"lede {'AR' if name == 'ar' else name} [{k}]"
                for cat in (p.category, "all"):
                    secs[(label, cat)] += out.result.seconds
                    toks[(label, cat)] += len(out.tokens)
                    same[label] &= out.tokens == ref
    cats = sorted({c for _, c in secs if c != "all"}) + ["all"]
    ar_ref = f"lede AR [{kernels[0]}]"
    rows = []
    for label in dict.fromkeys(m for m, _ in secs):
        row = {"method": label}
        for c in cats:
            tps = toks[(label, c)] / secs[(label, c)]
            row[f"{c} tok/s"] = tps
            row[f"{c} vs AR[{kernels[0]}]"] = tps / (toks[(ar_ref, c)] / secs[(ar_ref, c)])
        row["vs transformers (all)"] = row["all tok/s"] / (toks[("transformers generate", "all")]
                                                          / secs[("transformers generate", "all")])
        row["identical"] = same[label] if label != "transformers generate" else "-"
        rows.append(row)
    md = to_markdown(rows)
    head = (f"# Kernel choices: wall clock on {cpu_name()}, {torch.get_num_threads()} threads\n\n"
            f"`{json.dumps(vars(args), default=str)}`\n\nkernel tables (rows 1..9 | more): "
            + "; ".join(f"{k} = {t}" for k, t in tables.items()) + "\n\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(head + md + "\n")
    print(head + md)


if __name__ == "__main__":
    main()
