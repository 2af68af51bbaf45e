"""Greedy equivalence of the self-speculative decoder in fp32 and bf16, on the embedded model.

For each dtype (weights cast on load; on the CPU), each prompt and each action scheme (plain AR,
static (E, K) = (4, 4) and (8, 6), a random action sequence), the decoder generates; the output
is checked position by position against one teacher-forced pass in the same dtype
(:mod:`lede_env.equivalence`): exact argmax, near-tie (margin within the rounding tolerance),
violation. It is also compared with the same dtype's AR output (lede's own loop, action 0 every
round): how many generations differ and where the first differing token is. The rounding noise
behind the tolerance is measured too: the decoder's own verifier logits at every emitted
position (captured by wrapping ``LayerStack.greedy_tokens``) against the teacher-forced ones, in
ulps of the position's max |logit| (``eps(dtype) * max|z|``).

    python benchmarks/bf16_equivalence.py                  # 4 prompts, fp32 + bf16: under 3 min on 2 cores
    python benchmarks/bf16_equivalence.py --prompts "humaneval[24:32]" --dtypes fp32,bf16,fp16   # ~9 min
    python benchmarks/bf16_equivalence.py --model tiny     # the 4-layer tiny test model, seconds

The draft heads are logit-lens exits (4, 8) over the 4096 lowest token ids (cheap drafting on a
CPU; verification uses the full vocabulary, so the checked output does not depend on it).
"""

from __future__ import annotations

import argparse
import random
import sys
import time

import torch


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def capture_verifier_logits(stack):
    """Wrap ``stack.greedy_tokens`` (an instance attribute shadowing the method) to keep every
    call's logits [n, V] float32; returns ``(calls, undo)``."""
    calls = []

    def greedy_tokens(normed):
        z = stack.head_logits(normed)
        calls.append(z.float())
        return z.argmax(-1)

    stack.greedy_tokens = greedy_tokens
    return calls, lambda: stack.__dict__.pop("greedy_tokens", None)


def emitted_logits(calls, result) -> torch.Tensor:
    """The decoder's logits [G, V] behind each emitted token: the prefill's row, then the first
    ``emitted`` rows of each round's verification (greedy decoding calls ``greedy_tokens`` once
    at prefill and once per round)."""
    rows = [calls[0][-1:]] + [c[: r.emitted] for c, r in zip(calls[1:], result.rounds)]
    return torch.cat(rows)[: len(result.tokens)]


def run(bundle, prompts, max_new, schemes, seed=0):
    """Per-scheme result rows of one dtype, and per-position noise samples in ulps (``eps(dtype)
    x`` the position's max |teacher-forced logit|): ``vocab``, the largest |decoder logit -
    teacher-forced logit| over the vocabulary; ``pair``, the change of the gap between the
    teacher-forced top two tokens (what decides whether a near-tie flips); ``gap``, that top-2
    gap itself."""
    from lede_env.decoding import SelfSpeculativeDecoder
    from lede_env.equivalence import check_logits, first_divergence, teacher_forced_logits
    from lede_env.exits import ExitHeads

    stack = bundle.stack
    L = stack.num_layers
    # logit-lens exits; a draft head over the 4096 lowest token ids (BPE's most frequent merges)
    # keeps drafting cheap on the CPU; verification uses the full vocabulary either way
    exits = (1, 2, 3) if L <= 4 else (4, 8)
    V = stack.head_weight.shape[0]
    heads = ExitHeads(stack, exits, "lens", draft_vocab=min(V, 4096))
    dec = SelfSpeculativeDecoder(stack, heads, 8, bundle.eos_ids)
    eps = torch.finfo(stack.dtype).eps
    ar_out = {}
    rows, noise = [], {"vocab": [], "pair": [], "gap": []}
    rng = random.Random(seed)
    for name, make in schemes(dec, rng):
        r = dict(scheme=name, positions=0, exact=0, near=0, viol=0, max_margin=0.0, differ=0, first_div=[])
        for i, ids in enumerate(prompts):
            calls, undo = capture_verifier_logits(stack)
            try:
                res = dec.generate(torch.tensor(ids), make(), max_new)
            finally:
                undo()
            ar_out.setdefault(i, res.tokens)  # the first scheme is AR
            z_dec = emitted_logits(calls, res)
            z_tf = teacher_forced_logits(stack, ids, res.tokens).float()
            ulp = eps * z_tf.abs().max(-1).values
            noise["vocab"].extend(((z_dec - z_tf).abs().max(-1).values / ulp).tolist())
            top2 = z_tf.topk(2, -1).indices
            gap_tf = z_tf.gather(1, top2[:, :1]) - z_tf.gather(1, top2[:, 1:])
            gap_dec = z_dec.gather(1, top2[:, :1]) - z_dec.gather(1, top2[:, 1:])
            noise["pair"].extend(((gap_dec - gap_tf).abs()[:, 0] / ulp).tolist())
            noise["gap"].extend((gap_tf[:, 0] / ulp).tolist())
            rep = check_logits(z_tf, res.tokens, stack.dtype)
            r["positions"] += rep.positions
            r["exact"] += rep.exact
            r["near"] += len(rep.near_ties)
            r["viol"] += len(rep.violations)
            r["max_margin"] = max(r["max_margin"], rep.max_margin)
            d = first_divergence(res.tokens, ar_out[i])
            if d is not None:
                r["differ"] += 1
                r["first_div"].append(d)
        rows.append(r)
    return rows, noise


def schemes_for(dec, rng):
    from lede_env.decoding import SequencePolicy, StaticPolicy

    enc = dec.actions.encode
    L = dec.stack.num_layers
    statics = [(4, 4), (8, 6)] if L > 8 else [(1, 4), (3, 6)]
    out = [("AR (action 0)", lambda: StaticPolicy(0))]
    out += [(f"static E={E},K={K}", (lambda a: (lambda: StaticPolicy(a)))(enc(E, K))) for E, K in statics]
    acts = [rng.randrange(dec.actions.n) for _ in range(200)]
    out.append(("random actions", lambda: SequencePolicy(acts)))
    return out


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="'tiny' for the tiny test model; default: the embedded model")
    ap.add_argument("--prompts", default="humaneval[24:28]")
    ap.add_argument("--max-new", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32, bf16, fp16")
    ap.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: $LEDE_DEVICE, else cpu); GPU "
                                                   "kernels round differently, so re-measure the tolerance there")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sys.stdout.reconfigure(line_buffering=True)  # rows appear as each dtype finishes

    from lede_env.device import resolve_device
    from lede_env.model import load_model, tiny_llama
    from lede_env.prompts import load_prompts
    from lede_env.continuations import encode_prompts
    from lede_env.model import bundle_from_model

    t0 = time.perf_counter()
    device = resolve_device(args.device)
    dtypes = args.dtypes.split(",")
    if any(dt not in DTYPES for dt in dtypes):
        ap.error(f"--dtypes: choose from {sorted(DTYPES)}")
    if args.model == "tiny":
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(3, 128, (int(torch.randint(2, 11, (1,), generator=g)),), generator=g).tolist()
                   for _ in range(8)]
        bundles = {dt: bundle_from_model(tiny_llama(4, 64, 128, 0).to(device, DTYPES[dt]), name=f"tiny-{dt}")
                   for dt in dtypes}
        title = "tiny Llama (4 layers, d=64, V=128), 8 random prompts"
    else:
        bundles = {}
        for dt in dtypes:
            model, tok = load_model(None, dtype=DTYPES[dt], device=device)
            bundles[dt] = bundle_from_model(model, tok, name=f"smollm2-135m-instruct-{dt}")
        prompts = encode_prompts(bundles[dtypes[0]], load_prompts(args.prompts), args.max_new)
        title = f"SmolLM2-135M-Instruct, {args.prompts} ({len(prompts)} prompts)"

    print(f"### Greedy equivalence: {title}, {args.max_new} new tokens, {device}\n")
    print("| dtype | actions | positions | exact argmax | near-ties | violations | max margin (logits) "
          "| outputs != AR (same dtype) | first divergence |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    noise_rows, times = [], []
    for dt, b in bundles.items():
        t = time.perf_counter()
        rows, noise = run(b, prompts, args.max_new, schemes_for)
        times.append(f"{dt} {time.perf_counter() - t:.0f} s")
        for r in rows:
            fd = ", ".join(map(str, sorted(r["first_div"]))) or "-"
            print(f"| {dt} | {r['scheme']} | {r['positions']} | {r['exact']} | {r['near']} | {r['viol']} "
                  f"| {r['max_margin']:.3g} | {r['differ']} / {len(prompts)} | {fd} |")
        noise_rows.append((dt, noise))
    from lede_env.equivalence import TOLERANCE_ULPS

    print("\nRounding noise at each emitted position, in ulps (eps(dtype) x the position's max |teacher-forced "
          "logit|): `vocab` = max over the vocabulary of |decoder logit - teacher-forced logit|; `pair` = change "
          "of the teacher-forced top-2 gap in the decoder's logits (a near-tie flips when it exceeds the gap); "
          "`gap <= tol` = positions whose top-2 gap is within the default tolerance (either token would pass)\n")
    print("| dtype | positions | vocab median | vocab p99 | vocab max | pair median | pair p99 | pair max "
          "| tolerance (ulps) | gap <= tol |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for dt, n in noise_rows:
        k = TOLERANCE_ULPS[DTYPES[dt]]
        amb = sum(g <= k for g in n["gap"])
        print(f"| {dt} | {len(n['vocab'])} | {pct(n['vocab'], .5):.2f} | {pct(n['vocab'], .99):.2f} "
              f"| {max(n['vocab']):.2f} | {pct(n['pair'], .5):.2f} | {pct(n['pair'], .99):.2f} "
              f"| {max(n['pair']):.2f} | {k:g} | {amb} ({100 * amb / len(n['gap']):.1f}%) |")
    print(f"\n({time.perf_counter() - t0:.0f} s in all: {', '.join(times)})")


if __name__ == "__main__":
    main()
