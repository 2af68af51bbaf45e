"""Does the previous position's final hidden state help a shallow exit head agree with the full model?

When a round drafts the token after the pending one, the verifier has already computed the final
normed hidden state of the position before it (the one whose argmax is the pending token). EAGLE
(arXiv 2401.15077) drafts from the target model's top-layer features of earlier positions; here
the question is whether that feature, concatenated to the exit layer's own normed hidden state,
raises the exit head's top-1 agreement on every kind of text. Ridge fits (the ``affine`` head's
fit, without the KL fine-tune) on the default calibration continuations, judged on held-out
greedy continuations per prompt category:

- ``h_E``: today's affine translator input (the exit's normed hidden state at position t);
- ``h_E+final(t-1)``: plus the final normed hidden state at t-1 (exact for a round's first draft
  token);
- ``h_E+final(t-2)``: plus the one at t-2 (what a second draft token would have);
- ``final(t-1) only``: the deep feature alone.

    python benchmarks/deep_feature_heads.py --exits 2,4
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    from lede_env.calibration import HOLDOUT, HeadSpec, get_heads
    from lede_env.continuations import get_continuations
    from lede_env.exits import teacher_forced
    from lede_env.model import get_bundle
    from lede_env.prompts import DEFAULT_CALIB, DEFAULT_CALIB_MAX_NEW, DEFAULT_EVAL, load_prompts

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--exits", default="2,4")
    ap.add_argument("--eval-prompts", default=DEFAULT_EVAL)
    ap.add_argument("--ridge", type=float, default=1e-2, help="ridge strength relative to the mean diagonal")
    args = ap.parse_args()
    exits = tuple(int(e) for e in args.exits.split(","))
    torch.manual_seed(0)
    b = get_bundle()
    base = get_heads(b, HeadSpec(), progress=False)  # draft vocabulary and its LM-head rows
    calib = get_continuations(b, load_prompts(DEFAULT_CALIB), DEFAULT_CALIB_MAX_NEW, progress=False)
    fit = [(torch.tensor(c.prompt_ids + c.generated), len(c.prompt_ids)) for j, c in enumerate(calib)
           if j % HOLDOUT != HOLDOUT - 1]
    held = get_continuations(b, load_prompts(args.eval_prompts), 96, progress=False)
    cats = sorted({c.category for c in held})
    Wd = base.draft_w.float()

    def features(ids: torch.Tensor, start: int):
        """Per position t in [start, T-1): normed exit hiddens [N, n_exits, d], final(t), final(t-1),
        final(t-2) [N, d] and the next token [N]."""
        eh, final, _ = teacher_forced(b.stack, ids, exits)
        x, f = b.stack.norm(eh).float(), final.float()
        sl = slice(max(start, 2), ids.shape[0] - 1)
        return (x[sl], f[sl], f[sl.start - 1: sl.stop - 1], f[sl.start - 2: sl.stop - 2],
                ids[sl.start + 1: sl.stop + 1])

    t0 = time.time()
    F = [features(ids, n - 1) for ids, n in fit]
    H = [(c.category, *features(torch.tensor(c.prompt_ids + c.generated), len(c.prompt_ids) - 1)) for c in held]
    print(f"teacher-forced features of {len(fit)} + {len(held)} continuations: {time.time() - t0:.0f} s", flush=True)
    Y = torch.cat([f[1] for f in F])

    def ridge(X: torch.Tensor) -> torch.Tensor:
        X1 = torch.cat([X, torch.ones(X.shape[0], 1)], 1).double()
        A = X1.T @ X1
        A += args.ridge * A.diagonal().mean() * torch.eye(A.shape[0], dtype=A.dtype)
        return torch.linalg.solve(A, X1.T @ Y.double()).float()

    def draft(W: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
        return base.draft_ids[((torch.cat([X, torch.ones(X.shape[0], 1)], 1) @ W) @ Wd.T).argmax(-1)]

    print(f"\nTop-1 agreement on held-out {args.eval_prompts} (96-token greedy continuations), ridge heads "
          f"fitted on {DEFAULT_CALIB}\n")
    for i, e in enumerate(exits):
        inputs = {"h_E": lambda f: f[0][:, i],
                  "h_E+final(t-1)": lambda f: torch.cat([f[0][:, i], f[2]], 1),
                  "h_E+final(t-2)": lambda f: torch.cat([f[0][:, i], f[3]], 1),
                  "final(t-1) only": lambda f: f[2]}
        print(f"exit {e}:\n\n| head input | " + " | ".join(cats + ["all"]) + " |\n|---|" + "---|" * (len(cats) + 1))
        for name, build in inputs.items():
            W = ridge(torch.cat([build(f) for f in F]))
            hits = {c: [0, 0] for c in cats + ["all"]}
            for cat, *f in H:
                ok = int((draft(W, build(f)) == f[4]).sum())
                for c in (cat, "all"):
                    hits[c][0] += ok
                    hits[c][1] += f[4].numel()
            print(f"| {name} | " + " | ".join(f"{hits[c][0] / hits[c][1]:.3f}" for c in cats + ["all"]) + " |")
        print()


if __name__ == "__main__":
    main()
