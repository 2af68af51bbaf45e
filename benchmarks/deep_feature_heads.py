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
    python benchmarks/deep_feature_heads.py --exits 2,4 --replay   # + what it is worth in the trace env

``--replay``: the trace env (measured cost profile, copy actions of 1-8 tokens with datastore
drafts, calibrated stop) on the training and held-out splits, with each trace's exit-E drafts
replaced by the ``h_E+final(t-1)`` head's (exact for a round's first draft token, so only rounds
of K = 1 are replayed): the best static, the oracle, and the rule "copy where the context or the
datastore has a draft, else draft one token at exit E" (dropping the draft where the head's
probability is below a threshold, or by the env's calibrated stop), with the shipped heads and
with the deep-feature ones. The calibration continuations are read back from the shipped
datastore (:func:`lede_env.datastore.stored_text`) when it holds them, so nothing is decoded.
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
    ap.add_argument("--replay", action="store_true", help="also replay copy-else-exit-draft rules in the trace env")
    args = ap.parse_args()
    exits = tuple(int(e) for e in args.exits.split(","))
    torch.manual_seed(0)
    b = get_bundle()
    base = get_heads(b, HeadSpec(), progress=False)  # draft vocabulary and its LM-head rows
    from lede_env.continuations import get_datastore, stored_text
    from lede_env.datastore import spec_for

    spec = spec_for(DEFAULT_CALIB)
    text = stored_text(b, spec, get_datastore(b, spec, progress=False))
    calib = text[0] if text is not None and spec.calib_max_new_tokens == DEFAULT_CALIB_MAX_NEW else \
        get_continuations(b, load_prompts(DEFAULT_CALIB), DEFAULT_CALIB_MAX_NEW, progress=False)
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
    first_heads = {}
    for i, e in enumerate(exits):
        inputs = {"h_E": lambda f: f[0][:, i],
                  "h_E+final(t-1)": lambda f: torch.cat([f[0][:, i], f[2]], 1),
                  "h_E+final(t-2)": lambda f: torch.cat([f[0][:, i], f[3]], 1),
                  "final(t-1) only": lambda f: f[2]}
        print(f"exit {e}:\n\n| head input | " + " | ".join(cats + ["all"]) + " |\n|---|" + "---|" * (len(cats) + 1))
        for name, build in inputs.items():
            W = ridge(torch.cat([build(f) for f in F]))
            if name == "h_E+final(t-1)":
                first_heads[e] = W
            hits = {c: [0, 0] for c in cats + ["all"]}
            for cat, *f in H:
                ok = int((draft(W, build(f)) == f[4]).sum())
                for c in (cat, "all"):
                    hits[c][0] += ok
                    hits[c][1] += f[4].numel()
            print(f"| {name} | " + " | ".join(f"{hits[c][0] / hits[c][1]:.3f}" for c in cats + ["all"]) + " |")
        print()
    if args.replay:
        replay(b, base, exits, first_heads)


def replay(b, base, exits, first_heads) -> None:
    """The trace-env table of ``--replay`` (see the module docstring)."""
    import warnings

    from agents.evaluate import to_markdown, trace_eval
    from lede_env.config import studied_task
    from agents.policies import best_static_action
    from lede_env.env import LEDEEnv
    from lede_env.exits import teacher_forced
    from lede_env.policies import CopyElseDraftPolicy
    from lede_env.prompts import DEFAULT_EVAL, DEFAULT_TRAIN

    demo = studied_task()  # the demo's env (shipped heads): copies of 1-8 tokens, datastore, compact observation
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train = LEDEEnv(demo.replace(prompts=DEFAULT_TRAIN), progress=False)
        held = LEDEEnv(demo.replace(prompts=DEFAULT_EVAL, reward_lambda=train.reward_lambda), progress=False)
    static = best_static_action(train)[0]
    actions = held.unwrapped.actions

    E0, copy_len = actions.decode(static)
    if E0 != 0:
        raise SystemExit(f"The best static action is an exit draft (E={E0}): there is no copy to fall back from.")

    def copy_else(e: int, threshold: float) -> CopyElseDraftPolicy:
        """``copy-else`` with the static's copy length; threshold 0: the env's calibrated stop instead."""
        pol = CopyElseDraftPolicy(actions, copy_len, e, threshold or 0.5)
        if not threshold:
            pol.stop_rule = None  # the env's own rule applies (LEDEEnv.playing)
        return pol

    def policies() -> dict:
        return {f"copy, else E={e} K=1, " + (f"drop below {t}" if t else "calibrated stop"): copy_else(e, t)
                for e in exits for t in (0.0, 0.2, 0.35, 0.5)}

    def deepen(env) -> list[float]:
        """Replace each trace's exit-e drafts by the deep-feature head's; return the held-out
        first-token agreement per exit before and after."""
        hits = torch.zeros(len(exits), 2)
        n = 0
        for t in env.unwrapped.trace_set.traces:
            ids = torch.tensor(list(map(int, t.prompt)) + list(map(int, t.generated)))
            P, N = len(t.prompt), t.n
            eh, final, _ = teacher_forced(b.stack, ids, exits)
            x, f = b.stack.norm(eh).float()[P - 1:P - 1 + N], final.float()[P - 2:P - 2 + N]
            for k, e in enumerate(exits):
                i = base.exit_layers.index(e)
                X = torch.cat([x[:, k], f], 1)
                logits = (torch.cat([X, torch.ones(N, 1)], 1) @ first_heads[e]) @ base.draft_w.float().T
                top, arg = logits.max(-1)
                hits[k, 0] += int((t.draft[1:, i] == t.generated[1:]).sum())
                t.draft[:, i] = base.draft_ids[arg].numpy()
                t.draft_prob[:, i] = torch.exp(top - torch.logsumexp(logits, -1)).numpy()
                hits[k, 1] += int((t.draft[1:, i] == t.generated[1:]).sum())
            n += N - 1
        return (hits / n).tolist()

    rows = []
    for heads_name in ("shipped", "h_E+final(t-1)"):
        for split, env in (("train", train), ("held out", held)):
            if heads_name != "shipped":
                agree = deepen(env)
                print(f"{split}: first-token agreement per exit {exits}, shipped -> deep: "
                      + ", ".join(f"{a:.3f} -> {c:.3f}" for a, c in agree), flush=True)
            for r in trace_eval(env, ["static:best", "oracle"], static, policies=policies(),
                                by_category=split == "held out"):
                rows.append({"heads": heads_name, "split": split} | {k: r[k] for k in ("policy", "category",
                                                                                         "throughput")})
    print(to_markdown([r for r in rows if r["category"] == "all"]))
    print(to_markdown([r for r in rows if r["category"] != "all"]))


if __name__ == "__main__":
    main()
