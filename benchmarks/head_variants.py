"""Exit-head variants on the multi-domain calibration set, judged per category on held-out text.

Fits, for a few shallow exits, on the default calibration continuations (``DEFAULT_CALIB``):

- ``ridge``: today's affine translator (continuation positions only);
- ``ridge+prompts``: the same fit on prompt positions too (more text of every domain; the target
  is still the model's own final hidden state there);
- ``ridge+kl``: ridge, then the KL + top-1 fine-tune of ``affine-kl``;
- ``adapter``: ridge plus a low-rank non-linear residual, W h + b + U gelu(V h) (rank R), trained
  by the same KL + top-1 objective (a Kangaroo-style adapter, arXiv 2404.18911, without the
  attention block);

and reports top-1 agreement with the full model on held-out greedy continuations
(``DEFAULT_EVAL``, 96 tokens) per prompt category, and each head's time per draft token.

    python benchmarks/head_variants.py --exits 2,4 --steps 600
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    from lede_env.costs import min_time
    from lede_env.exits import ExitHeads, fit_affine, teacher_forced
    from lede_env.prompts import DEFAULT_CALIB, DEFAULT_CALIB_MAX_NEW, DEFAULT_EVAL, load_prompts
    from lede_env.calibration import HOLDOUT, HeadSpec, get_heads
    from lede_env.continuations import get_continuations
    from lede_env.model import get_bundle

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--exits", default="2,4")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--rank", type=int, default=256)
    ap.add_argument("--eval-prompts", default=DEFAULT_EVAL)
    args = ap.parse_args()
    exits = tuple(int(e) for e in args.exits.split(","))
    torch.manual_seed(0)
    b = get_bundle()
    base = get_heads(b, HeadSpec(), progress=False)  # for the draft vocabulary ranking
    calib = get_continuations(b, load_prompts(DEFAULT_CALIB), DEFAULT_CALIB_MAX_NEW, progress=False)
    fit = [(torch.tensor(c.prompt_ids + c.generated), len(c.prompt_ids)) for j, c in enumerate(calib)
           if j % HOLDOUT != HOLDOUT - 1]
    held = get_continuations(b, load_prompts(args.eval_prompts), 96, progress=False)
    cats = sorted({c.category for c in held})

    def new_heads():
        h = ExitHeads(b.stack, exits, "affine", base.vocab_rank, base.draft_vocab, base.feature_vocab)
        return h

    # teacher-forced features once: exit hiddens (normed) and final normed hidden, per position
    t0 = time.time()
    feats = []
    for ids, n_prompt in fit:
        eh, final, _ = teacher_forced(b.stack, ids, exits)
        feats.append((b.stack.norm(eh[:-1]).float(), final[:-1].float(), max(n_prompt - 1, 0)))
    print(f"teacher-forced features of {len(fit)} calibration continuations: {time.time() - t0:.0f} s", flush=True)
    Wd = base.draft_w.float()

    # held-out features once too: per continuation, its category, normed exit hiddens and targets
    held_feats = []
    for c in held:
        ids = torch.tensor(c.prompt_ids + c.generated)
        eh, _, _ = teacher_forced(b.stack, ids, exits)
        sl = slice(len(c.prompt_ids) - 1, ids.shape[0] - 1)
        held_feats.append((c.category, b.stack.norm(eh[sl]).float(), ids[sl.start + 1: sl.stop + 1]))

    def agreement_of(draft_fn) -> dict:
        """{category: {exit: agreement}} of ``draft_fn(exit_index, normed hidden [T, d]) -> tokens``."""
        hits = {cat: torch.zeros(len(exits)) for cat in cats + ["all"]}
        total = dict.fromkeys(cats + ["all"], 0)
        for cat, x, target in held_feats:
            for i in range(len(exits)):
                h = (draft_fn(i, x[:, i]) == target).sum().item()
                hits[cat][i] += h
                hits["all"][i] += h
            total[cat] += target.numel()
            total["all"] += target.numel()
        return {cat: {e: hits[cat][i].item() / max(total[cat], 1) for i, e in enumerate(exits)}
                for cat in cats + ["all"]}

    results, times = {}, {}
    x1 = torch.randn(1, b.stack.hidden_size)

    def affine_fn(h):
        return lambda i, x: h.draft_ids[(torch.addmm(h.bias[i], x, h.weight[i]) @ Wd.T).argmax(-1)]

    # ridge (today's fit)
    h = new_heads()
    fit_affine(h, fit)
    results["ridge"] = agreement_of(affine_fn(h))
    times["ridge"] = 1000 * min_time(lambda: h.draft_tokens(x1, 0), 30)
    ridge = h
    # ridge on prompt positions too
    h2 = new_heads()
    fit_affine(h2, [(ids, 1) for ids, _ in fit])
    results["ridge+prompts"] = agreement_of(affine_fn(h2))
    times["ridge+prompts"] = times["ridge"]

    # KL + top-1 fine-tunes: affine only, or affine + low-rank non-linear residual
    X = [torch.cat([f[0][:, i] for f in feats]) for i in range(len(exits))]  # [N, d] per exit
    Y = torch.cat([f[1] for f in feats])
    with torch.no_grad():
        teacher = torch.log_softmax(Y @ Wd.T, -1)
        target = teacher.argmax(-1)

    def train(i: int, rank: int):
        W = ridge.weight[i].float().clone().requires_grad_(True)
        bias = ridge.bias[i].float().clone().requires_grad_(True)
        params = [W, bias]
        if rank:
            V = (torch.randn(b.stack.hidden_size, rank) / b.stack.hidden_size ** 0.5).requires_grad_(True)
            U = torch.zeros(rank, b.stack.hidden_size, requires_grad=True)
            params += [V, U]
        opt = torch.optim.Adam(params, lr=5e-4)
        g = torch.Generator().manual_seed(i)
        for _ in range(args.steps):
            idx = torch.randint(0, X[i].shape[0], (256,), generator=g)
            x = X[i][idx]
            z = x @ W + bias
            if rank:
                z = z + torch.nn.functional.gelu(x @ V) @ U
            logp = torch.log_softmax(z @ Wd.T, -1)
            t = teacher[idx]
            loss = (t.exp() * (t - logp)).sum(-1).mean() + torch.nn.functional.nll_loss(logp, target[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        return [p.detach() for p in params]

    for name, rank in (("ridge+kl", 0), (f"adapter r={args.rank}", args.rank)):
        t0 = time.time()
        ps = [train(i, rank) for i in range(len(exits))]

        def fn(i, x, ps=ps, rank=rank):
            z = x @ ps[i][0] + ps[i][1]
            if rank:
                z = z + torch.nn.functional.gelu(x @ ps[i][2]) @ ps[i][3]
            return base.draft_ids[(z @ Wd.T).argmax(-1)]

        results[name] = agreement_of(fn)
        times[name] = 1000 * min_time(lambda: fn(0, x1), 30)
        print(f"{name}: trained in {time.time() - t0:.0f} s", flush=True)

    print(f"\nTop-1 agreement on held-out {args.eval_prompts} (96-token greedy continuations), heads fitted "
          f"on {DEFAULT_CALIB}; ms = one draft-head call for one token\n")
    for e in exits:
        print(f"exit {e}:\n\n| head | ms | " + " | ".join(cats + ["all"]) + " |\n|---|---|" + "---|" * (len(cats) + 1))
        for name, tab in results.items():
            print(f"| {name} | {times[name]:.2f} | " + " | ".join(f"{tab[c][e]:.3f}" for c in cats + ["all"]) + " |")
        print()


if __name__ == "__main__":
    main()
