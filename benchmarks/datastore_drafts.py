"""Where the context has no match, how often and how well does the datastore draft?

For every position of the held-out prompts' greedy continuations at which the context has no
match (``lede_env.lookup.context_match`` finds no earlier occurrence of the last 2-3 tokens, so a
context draft proposes nothing), asks the model's datastore (``lede_env.datastore``: its own
greedy text of the calibration prompts and of ``DATASTORE_EXTRA``, none of the training or
evaluation prompts; with ``--calib-only`` also the store of the calibration text alone) for a draft of
up to ``--max-len`` tokens and reports per prompt category: the share of those positions with a
draft, the first draft token's agreement with the full model, and the draft tokens the full model
would accept per draft (teacher-forced: each position on its own, not a decoding run; the trace
env and ``benchmarks/agent_vs_static.py --context-datastore 1`` measure decoding).

With ``--live N`` it also decodes the first N held-out prompts of each category for real, one
process, methods interleaved prompt by prompt and repeated: plain AR steps, context drafts of up
to 4 and 8 tokens, and the same with each datastore where the context has no match; it reports
each method's wall-clock speedup over the AR loop per category (and checks every output is
identical to AR's).

    python benchmarks/datastore_drafts.py
    python benchmarks/datastore_drafts.py --eval-prompts wide --max-len 8
    python benchmarks/datastore_drafts.py --live 3 --repeats 2
    python benchmarks/datastore_drafts.py --calib-only --live 3      # the default store against the smaller one
    python benchmarks/datastore_drafts.py --fractions 0.25,0.5,1     # stores of part of the calibration text
"""

from __future__ import annotations

import argparse
import random


def main() -> None:
    from lede_env.continuations import get_continuations
    from lede_env.continuations import datastore_text, get_datastore
    from lede_env.datastore import DatastoreSpec, build_datastore
    from lede_env.model import get_bundle
    from lede_env.prompts import DEFAULT_EVAL, DEFAULT_MAX_NEW, WIDE_EVAL, load_prompts

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--eval-prompts", default=DEFAULT_EVAL, help="prompt spec, or 'wide' for WIDE_EVAL")
    ap.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW)
    ap.add_argument("--max-len", type=int, default=4, help="most tokens per draft")
    ap.add_argument("--live", type=int, default=0, help="held-out prompts per category decoded for real")
    ap.add_argument("--repeats", type=int, default=2, help="decodes of each prompt per method (--live)")
    ap.add_argument("--calib-only", action="store_true",
                    help="also the store of the calibration continuations alone (no DATASTORE_EXTRA text), "
                         "beside the default one")
    ap.add_argument("--fractions", default="",
                    help="also stores built from these shares of the calibration continuations (shuffled with "
                         "a fixed seed), e.g. 0.25,0.5: how the store's size matters (teacher-forced only)")
    args = ap.parse_args()
    b = get_bundle()
    stores = {"datastore": get_datastore(b)}
    if args.calib_only:
        stores["calibration-only datastore"] = get_datastore(b, DatastoreSpec(extra_prompts=""))
    if args.fractions:
        calib = datastore_text(b, DatastoreSpec(extra_prompts=""), progress=False)
        random.Random(0).shuffle(calib)
        for f in (float(x) for x in args.fractions.split(",")):
            stores[f"{f:g} of the calibration text"] = build_datastore(calib[: round(len(calib) * f)], DatastoreSpec())
    prompts = load_prompts(WIDE_EVAL if args.eval_prompts == "wide" else args.eval_prompts)
    held = get_continuations(b, prompts, args.max_new_tokens, progress=False)
    for name, store in stores.items():
        teacher_forced(name, store, held, args.max_len)
    if args.live:
        live(b, {k: v for k, v in stores.items() if " of the calibration text" not in k}, prompts, args)


def teacher_forced(name, store, held, max_len: int) -> None:
    """Per category: positions without a context match, the store's drafts there, their first
    token's agreement and the tokens accepted per draft."""
    from lede_env.lookup import DEFAULT_NGRAM, context_match

    stats: dict[str, list[int]] = {}
    for c in held:
        P, G = list(c.prompt_ids), list(c.generated)
        s = stats.setdefault(c.category, [0, 0, 0, 0, 0])  # positions, no match, drafts, first ok, accepted
        for p in range(len(G) - 1):
            seq = P + G[:p + 1]
            s[0] += 1
            if context_match(seq, max_len, DEFAULT_NGRAM)[0]:
                continue
            s[1] += 1
            d = store.propose(seq, max_len)
            if not d:
                continue
            k = 0
            while k < len(d) and p + 1 + k < len(G) and d[k] == G[p + 1 + k]:
                k += 1
            s[2] += 1
            s[3] += k > 0
            s[4] += k
    tot = [sum(v[i] for v in stats.values()) for i in range(5)]
    print(f"\n{name}: {store.tokens} tokens, {len(store)} n-grams, fingerprint {store.fingerprint()}\n")
    print("| category | positions | no context match | datastore draft there | first token agrees | "
          "accepted per draft | accepted per position without a match |\n|---|---|---|---|---|---|---|")
    for cat, v in list(stats.items()) + [("all", tot)]:
        print(f"| {cat} | {v[0]} | {v[1] / max(v[0], 1):.2f} | {v[2] / max(v[1], 1):.2f} | "
              f"{v[3] / max(v[2], 1):.2f} | {v[4] / max(v[2], 1):.2f} | {v[4] / max(v[1], 1):.3f} |")


def live(b, stores, prompts, args) -> None:
    """Wall clock: AR, context drafts of up to 4 / 8 tokens without and with each datastore."""
    import torch

    from lede_env.calibration import HeadSpec, get_heads
    from lede_env.decoding import SelfSpeculativeDecoder
    from lede_env.policies import StaticPolicy
    from lede_env.continuations import encode_prompts
    from lede_env.prompts import first_per_category

    heads = get_heads(b, HeadSpec(), progress=False)
    decoders = {"AR": SelfSpeculativeDecoder(b.stack, heads, 8, b.eos_ids)}
    for m in (4, 8):
        decoders[f"context <= {m}"] = SelfSpeculativeDecoder(b.stack, heads, 8, b.eos_ids, context_draft=m)
        for name, store in stores.items():
            decoders[f"context <= {m} + {name}"] = SelfSpeculativeDecoder(b.stack, heads, 8, b.eos_ids,
                                                                          context_draft=m, context_datastore=store)
    seconds = {name: {} for name in decoders}
    tokens = {}
    chosen = first_per_category(prompts, args.live)
    encoded = [torch.tensor(x) for x in encode_prompts(b, chosen, args.max_new_tokens)]
    with torch.no_grad():
        decoders["AR"].generate(encoded[0], StaticPolicy(0), 8)  # warm-up
        for _ in range(args.repeats):
            for p, ids in zip(chosen, encoded):
                for name, dec in decoders.items():
                    r = dec.generate(ids, StaticPolicy(0), args.max_new_tokens)
                    if name == "AR":
                        tokens[p.id] = r.tokens
                    elif r.tokens != tokens[p.id]:
                        raise SystemExit(f"{name} on {p.id}: output differs from AR's")
                    per = seconds[name].setdefault(p.category, [0.0, 0])
                    per[0] += r.seconds
                    per[1] += len(r.tokens)
    cats = list(seconds["AR"])
    print(f"\nWall clock, {len(chosen)} prompts x {args.repeats}, speedup over AR (every output identical to AR's)\n")
    print("| method | " + " | ".join(cats + ["all"]) + " |\n|---|" + "---|" * (len(cats) + 1))
    for name in decoders:
        def tps(m, c):
            return seconds[m][c][1] / seconds[m][c][0]
        all_ = sum(seconds[name][c][1] for c in cats) / sum(seconds[name][c][0] for c in cats)
        ar_all = sum(seconds["AR"][c][1] for c in cats) / sum(seconds["AR"][c][0] for c in cats)
        print(f"| {name} | " + " | ".join(f"{tps(name, c) / tps('AR', c):.3f}" for c in cats)
              + f" | {all_ / ar_all:.3f} |")


if __name__ == "__main__":
    main()
