"""One harness for the wall-clock comparisons: ``python benchmarks/bench.py SUBCOMMAND [options]``.

Every subcommand decodes the same prompts with every method in one process, methods interleaved
prompt by prompt (:func:`paired`, so machine noise hits them alike; ``--repeats N`` runs the
whole pass N times), names lede's policies as ``lede evaluate`` does (:mod:`agents.evaluate`:
``ar``, ``static:E,K``, ``del``, ``copy-else:M,E,T``, ``agent:PATH``, ...), computes its metrics
with :mod:`lede_env.metrics` and writes Markdown tables (:func:`agents.tables.to_markdown`) to
``--out`` and stdout. Subcommands (``python benchmarks/bench.py SUBCOMMAND --help`` for options):

- ``speed``: kernels, exit heads, the bonus token and the oracle's replay against AR, beside the
  speedup the trace env predicts;
- ``generate``: ``Lede.generate`` against transformers' ``model.generate``, greedy and sampled;
- ``context-draft``: context drafts (prompt lookup) against transformers' prompt lookup and
  lede's other drafters;
- ``kernels``: the CPU kernel choice's effect on AR and self-speculative decoding;
- ``live-env``: steps per second of the trace and live backends; a greedy-trained agent under
  sampling;
- ``agent-vs-static``: a ``trace_q`` agent trained here against the best static (E, K), DEL-style
  and AR, per category, in the trace env and (``--live N``) on the clock;
- ``policies``: ``lede evaluate``'s harness (:func:`agents.evaluate.trace_eval`,
  :func:`agents.evaluate.live_eval`) on the studied task, repeated, each ratio's spread per repeat;
- ``trees``: token-tree actions (issue 37) in the trace env of the registered task, per held-out
  category: fixed trees, the static tree rule, the best static action and the hindsight oracles
  with and without trees, against copy <= 4 (deterministic); ``--agent-seeds``: ``trace_q`` trained
  with and without the tree actions beside them; then the same policies on the clock.

    python benchmarks/bench.py context-draft --per-category 1 --max-new-tokens 32
    python benchmarks/bench.py policies --policies static:best,copy-else:8,2,0.35 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Hashable, Optional

import torch

from agents.tables import to_markdown
from lede_env.metrics import RoundTotals, speedup, tokens_per_second

# --------------------------------------------------------------------------------------------
# the harness


@dataclass
class Run:
    """One generation of one method on one prompt.

    Attributes:
        seconds: wall-clock seconds, prefill included.
        tokens: the generated ids.
        totals: the rounds' sums (:class:`lede_env.metrics.RoundTotals`); ``None`` where lede
            cannot see the rounds (transformers' assisted or lookup decoding).
        policy_seconds: the policy's own time over the rounds.
        predicted_cost: what the trace env charges for the same actions (AR-step units; 0 if not
            asked for).
    """

    seconds: float
    tokens: list
    totals: Optional[RoundTotals] = None
    policy_seconds: float = 0.0
    predicted_cost: float = 0.0


def plain_rounds(tokens: list) -> RoundTotals:
    """The rounds of plain decoding: one a token after the prefill's (whose token is no round's)."""
    n = max(len(tokens) - 1, 0)
    return RoundTotals(rounds=n, tokens=n)


@dataclass
class Tally:
    """A method's sums over the prompts of one group (``"all"`` or a category) and every repeat."""

    seconds: float = 0.0
    tokens: int = 0
    totals: RoundTotals = field(default_factory=RoundTotals)
    policy_seconds: float = 0.0
    predicted_cost: float = 0.0
    identical: bool = True

    def add(self, run: Run, identical: bool) -> None:
        self.seconds += run.seconds
        self.tokens += len(run.tokens)
        if run.totals is not None:
            self.totals += run.totals
        self.policy_seconds += run.policy_seconds
        self.predicted_cost += run.predicted_cost
        self.identical &= identical

    @property
    def tokens_per_s(self) -> float:
        return tokens_per_second(self.tokens, self.seconds)

    def speedup_over(self, ref: "Tally") -> float:
        """Tokens/s over ``ref``'s (the same prompts: a ratio of total times for equal outputs)."""
        return speedup(self.tokens, self.seconds, ref.tokens, ref.seconds)

    @property
    def policy_ms_per_round(self) -> float:
        return 1000 * self.policy_seconds / self.totals.rounds if self.totals.rounds else float("nan")


def paired(items: list[tuple[str, object]], methods: dict[Hashable, Callable[[int, object], Run]],
           repeats: int = 1, reference: Optional[Hashable] = None) -> dict[tuple, Tally]:
    """Every method on every item, interleaved item by item, ``repeats`` times.

    Args:
        items: ``(category, item)`` pairs (an item is what the methods decode: ids, a trace, ...).
        methods: ``{label: run(index, item) -> Run}``, called in this order on each item.
        reference: the label whose tokens every other method's are compared with (``identical``;
            default: the first method).

    Returns:
        ``{(label, group): Tally}`` for the groups ``"all"`` and each item's category.
    """
    tallies: dict[tuple, Tally] = defaultdict(Tally)
    ref = next(iter(methods)) if reference is None else reference
    for _ in range(repeats):
        for i, (category, item) in enumerate(items):
            runs = {label: run(i, item) for label, run in methods.items()}
            for label, r in runs.items():
                for group in ("all", category):
                    tallies[(label, group)].add(r, r.tokens == runs[ref].tokens)
    return tallies


def categories(tallies: dict[tuple, Tally]) -> list[str]:
    """The categories of :func:`paired`'s tallies, sorted, then ``"all"``."""
    return sorted({g for _, g in tallies if g != "all"}) + ["all"]


def labels(tallies: dict[tuple, Tally]) -> list:
    """The methods of :func:`paired`'s tallies, in their order."""
    return list(dict.fromkeys(m for m, _ in tallies))


def time_transformers(bundle, ids: list[int], max_new_tokens: int, **generate_kwargs) -> Run:
    """transformers' ``model.generate`` on ``ids``, timed (device synchronised); rounds unseen."""
    from lede_env.device import synchronize

    x = torch.tensor(ids).view(1, -1).to(bundle.stack.device)
    synchronize(bundle.stack.device)
    t0 = time.perf_counter()
    out = bundle.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                                pad_token_id=bundle.eos_ids[0], **generate_kwargs)[0, x.shape[1]:].tolist()
    synchronize(bundle.stack.device)
    return Run(time.perf_counter() - t0, out)


def time_lede(lede, ids: list[int], max_new_tokens: int, **generate_kwargs) -> Run:
    """:meth:`lede_env.generate.Lede.generate` on ``ids`` (its own timing, rounds and policy time)."""
    out = lede.generate(input_ids=torch.tensor(ids), max_new_tokens=max_new_tokens, **generate_kwargs)
    return Run(out.result.seconds, list(out.tokens), out.result.totals,
               sum(r.policy_seconds for r in out.result.rounds))


def add_common(ap: argparse.ArgumentParser, prompts: Optional[str], max_new_tokens: int, out: Optional[str],
               device: bool = True, repeats: bool = True) -> None:
    """The options every timing subcommand takes: prompts, tokens, output, device, repeats."""
    ap.add_argument("--prompts", default=prompts, help="prompt spec ('+' joins specs)")
    ap.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    if out is not None:
        ap.add_argument("--out", type=Path, default=Path(out), help="Markdown report")
    if device:
        ap.add_argument("--device", default=None, help="cpu, cuda, cuda:N or auto (default: $LEDE_DEVICE, else cpu)")
        ap.add_argument("--dtype", default=None, help="fp32, bf16 or fp16 (default: bf16 on CUDA, fp32 on CPU)")
    if repeats:
        ap.add_argument("--repeats", type=int, default=1, help="passes over the prompts (sums over all)")


def set_device(args) -> None:
    from lede_env.device import set_default_device

    set_default_device(getattr(args, "device", None), getattr(args, "dtype", None))


def write_report(out: Path, title: str, args, body: str) -> None:
    """Write ``# title``, the arguments and ``body`` (Markdown) to ``out``; print ``body``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"# {title}\n\n`{json.dumps(vars(args), default=str)}`\n\n{body}\n")
    print(body)


# --------------------------------------------------------------------------------------------
# speed


def _speed_args(ap):
    add_common(ap, "humaneval[32:40]+../shared/data/spec_bench_dev.jsonl[0:160:20]", 96, "runs/bench/speed.md")
    ap.add_argument("--train-prompts", default="humaneval[0:24]")
    ap.add_argument("--calib-prompts", default="humaneval[100:132]")
    ap.add_argument("--head-kind", default="affine-kl", help="learned exit-head kind (lede_env.exits.HEAD_KINDS)")
    ap.add_argument("--draft-vocab", type=int, default=8192)
    ap.add_argument("--ee-grid", default="4,8,16,24")
    ap.add_argument("--ee-prompts", type=int, default=2)
    ap.add_argument("--ee-tokens", type=int, default=32)


def speed(args) -> None:
    """Wall-clock speed of self-speculative decoding on the embedded model, all greedy, on
    held-out prompts: ``AR`` (lede's loop, the reference), ``transformers generate``,
    ``transformers assistant_early_exit=E`` (the best E of ``--ee-grid`` on the first
    ``--ee-prompts`` prompts and ``--ee-tokens`` tokens, compared per token), the best static
    (E, K) with logit-lens exits (full vocabulary, no reuse), with learned heads (``--head-kind``,
    the truncated draft vocabulary, reuse; with and without the bonus token) and the oracle's
    action sequence replayed. Statics are chosen on the training traces; ``predicted_speedup``
    is what the trace env predicts for the same actions (AR cost / method cost, measured profile)."""
    set_device(args)
    from agents.policies import best_static_action
    from lede_env.calibration import HeadSpec, get_heads
    from lede_env.decoding import PlanPolicy, StaticPolicy, greedy_reference
    from lede_env.device import synchronize
    from lede_env.env import LEDEEnv
    from lede_env.model import get_bundle
    from lede_env.replay import oracle_plan, rollout

    b = get_bundle(None)
    common = dict(max_new_tokens=args.max_new_tokens, calib_prompts=args.calib_prompts, cost_profile="measured",
                  progress=False)
    learned = dict(head_kind=args.head_kind, draft_vocab=args.draft_vocab, reuse=True)
    variants = {"lens": dict(head_kind="lens", draft_vocab=None, reuse=False),
                "learned": dict(learned, bonus=True), "learned, no bonus": dict(learned, bonus=False)}
    envs, decs, statics = {}, {}, {}
    for name, kw in variants.items():
        envs[name] = u = LEDEEnv(prompts=args.prompts, **common, **kw)
        statics[name], _ = best_static_action(LEDEEnv(prompts=args.train_prompts, **common, **kw))
        heads = get_heads(b, HeadSpec(kind=kw["head_kind"], draft_vocab=kw["draft_vocab"],
                                      calib_prompts=args.calib_prompts))
        decs[name] = u.make_decoder(b, heads)
    env = envs["learned"]
    traces = [(i, env.trace_set.traces[i]) for i in env.playable]
    plans = {v: {t.id: oracle_plan(t, envs[v].rules.without_overhead(), env.max_new_tokens)[0] for _, t in traces}
             for v in ("learned", "learned, no bonus")}

    def lede(var, make_policy):
        def run(_, item):
            i, t = item
            out = decs[var].generate(torch.tensor(t.prompt), make_policy(t), args.max_new_tokens)
            u, acts = envs[var], iter([rd.action for rd in out.rounds])
            # what the trace env predicts for the same actions (none of these methods reads
            # observations, so no feature/policy overhead is charged)
            pred = rollout(u.trace_set.traces[i], u.rules.without_overhead(), u.max_new_tokens,
                           lambda g: next(acts, 0))["cost"]
            return Run(out.seconds, out.tokens, out.totals, predicted_cost=pred)
        return run

    def hf(_, item):
        p = torch.tensor(item[1].prompt)
        synchronize(b.stack.device)
        t0 = time.perf_counter()
        toks = greedy_reference(b.model, p, args.max_new_tokens, b.eos_ids)
        synchronize(b.stack.device)
        return Run(time.perf_counter() - t0, toks, plain_rounds(toks))

    kind = f"{args.head_kind}+vocab{args.draft_vocab}+reuse"
    methods = {
        "AR": lede("learned", lambda t: StaticPolicy(0)),
        "static lens, no reuse": lede("lens", lambda t: StaticPolicy(statics["lens"])),
        f"static {kind}": lede("learned", lambda t: StaticPolicy(statics["learned"])),
        f"static {kind}, no bonus": lede("learned, no bonus", lambda t: StaticPolicy(statics["learned, no bonus"])),
        "oracle replay": lede("learned", lambda t: PlanPolicy(plans["learned"][t.id])),
        "oracle replay, no bonus": lede("learned, no bonus", lambda t: PlanPolicy(plans["learned, no bonus"][t.id])),
        "transformers generate": hf,
    }
    decs["learned"].generate(torch.tensor(traces[0][1].prompt), StaticPolicy(0), 4)  # warm-up
    tallies = paired([(t.category, (i, t)) for i, t in traces], methods, args.repeats)
    ar = tallies[("AR", "all")]
    rows = []
    for m in ["AR", "transformers generate", *list(methods)[1:-1]]:
        r = tallies[(m, "all")]
        rows.append({"method": m, "tokens_per_s": r.tokens_per_s, "speedup_vs_ar": r.speedup_over(ar),
                     "tokens_per_round": r.totals.tokens_per_round,
                     "predicted_speedup": ar.predicted_cost / r.predicted_cost if r.predicted_cost else float("nan"),
                     "identical_to_ar": r.identical})
    rows.append(_speed_early_exit(args, b, decs["learned"], [t for _, t in traces[: args.ee_prompts]]))
    static_desc = {k: envs[k].actions.decode(v) for k, v in statics.items()}
    print(f"static choices (E, K): {static_desc}")
    write_report(args.out, "Speed benchmark", args, f"static choices (E, K): {static_desc}\n\n{to_markdown(rows)}")


def _speed_early_exit(args, b, dec, sub) -> dict:
    """transformers' ``assistant_early_exit`` (slow: a few prompts and tokens) at the best E of
    the grid on the first prompt, against lede's AR loop on the same prompts and tokens."""
    from lede_env.decoding import StaticPolicy

    def early_exit(E):
        return lambda _, t: time_transformers(b, t.prompt, args.ee_tokens, assistant_early_exit=E, do_sample=False)

    grid = {E: early_exit(E)(0, sub[0]) for E in (int(x) for x in args.ee_grid.split(","))}
    E = max(grid, key=lambda e: len(grid[e].tokens) / grid[e].seconds)

    def ar(_, t):
        o = dec.generate(torch.tensor(t.prompt), StaticPolicy(0), args.ee_tokens)
        return Run(o.seconds, o.tokens, o.totals)

    tallies = paired([(t.category, t) for t in sub], {"ee": early_exit(E), "ar": ar}, args.repeats)
    ee = tallies[("ee", "all")]
    return {"method": f"transformers assistant_early_exit={E}", "tokens_per_s": ee.tokens_per_s,
            "speedup_vs_ar": ee.speedup_over(tallies[("ar", "all")]), "tokens_per_round": float("nan"),
            "predicted_speedup": float("nan"), "identical_to_ar": None}


# --------------------------------------------------------------------------------------------
# generate


def _generate_args(ap):
    add_common(ap, "humaneval[24:32]+../shared/data/spec_bench_dev.jsonl[0:160:40]", 96, "runs/bench/generate.md")
    ap.add_argument("--policies", default="static:2,1,del", help="comma-separated lede policies / agent folders")
    ap.add_argument("--temperature", type=float, default=0.7)


def generate(args) -> None:
    """``Lede.generate`` with each policy against transformers' ``model.generate``, greedy and
    sampled at ``--temperature`` (speculative sampling, seeded per prompt): tokens/s, speedup over
    transformers in the same mode (sampled outputs differ in length), tokens per round,
    acceptance, the policy's own time per round and, greedy, whether the tokens equal
    transformers'."""
    set_device(args)
    from lede_env.continuations import encode_prompts
    from lede_env.generate import Lede
    from lede_env.model import get_bundle
    from lede_env.policies import split_policies
    from lede_env.prompts import load_prompts

    b = get_bundle(None)
    prompts = load_prompts(args.prompts)
    encoded = encode_prompts(b, prompts, args.max_new_tokens)
    ledes = {p: Lede(None, policy=p) for p in split_policies(args.policies)}
    T = args.temperature
    sampling = {"greedy": dict(do_sample=False), "sampled": dict(do_sample=True, temperature=T, top_p=1.0, top_k=0)}

    def hf(mode):
        def run(i, ids):
            torch.manual_seed(i)
            r = time_transformers(b, ids, args.max_new_tokens, **sampling[mode])
            r.totals = plain_rounds(r.tokens)
            return r
        return run

    def lede(p, mode):
        return lambda i, ids: time_lede(ledes[p], ids, args.max_new_tokens, temperature=0.0 if mode == "greedy" else T,
                                        seed=i)

    methods = {}
    for mode in sampling:
        methods[("transformers generate", mode)] = hf(mode)
        methods |= {(f"lede {p}", mode): lede(p, mode) for p in ledes}
    time_transformers(b, encoded[0], 4, do_sample=False)  # warm-up
    for x in ledes.values():
        x.generate(input_ids=torch.tensor(encoded[0]), max_new_tokens=4)
    tallies = paired([(p.category, ids) for p, ids in zip(prompts, encoded)], methods, args.repeats,
                     reference=("transformers generate", "greedy"))
    rows = []
    for name, mode in methods:
        s, ref = tallies[((name, mode), "all")], tallies[(("transformers generate", mode), "all")]
        rows.append({"method": name, "mode": mode, "tokens_per_s": s.tokens_per_s,
                     "speedup_vs_transformers": s.speedup_over(ref), "tokens_per_round": s.totals.tokens_per_round,
                     "acceptance": s.totals.acceptance, "policy_ms_per_round": s.policy_ms_per_round,
                     "identical_to_greedy": s.identical if mode == "greedy" else "-"})
    write_report(args.out, "lede generate vs transformers generate", args,
                 f"speedup = tokens/s ratio to transformers generate in the same mode\n\n{to_markdown(rows)}")


# --------------------------------------------------------------------------------------------
# context drafts


def _context_draft_args(ap):
    add_common(ap, None, 64, "runs/bench/context_draft.md", device=False)
    ap.add_argument("--per-category", type=int, default=2, help="prompts per category")
    ap.add_argument("--methods", default="ar;ar+ctx4;ar+ctx8;static:2,1;static:2,1+ctx4;del+ctx4",
                    help="lede methods: POLICY or POLICY+ctxN, separated by ';'")
    ap.add_argument("--hf-lookup", default="4,10", help="transformers prompt_lookup_num_tokens values")


def context_draft(args) -> None:
    """Context drafts against transformers' prompt lookup, greedy, on a few held-out prompts
    per category of ``WIDE_EVAL`` and of the packaged context-heavy prompts (``context``):
    ``transformers generate``, ``transformers prompt lookup N`` (``prompt_lookup_num_tokens=N``),
    and lede methods ``POLICY+ctxN`` (context drafts of up to N tokens on plain steps,
    :mod:`lede_env.lookup`). Per category: speedup over ``lede ar``; overall: tokens/s, speedup
    over transformers, tokens per round, and whether every output equals transformers' greedy
    tokens."""
    from lede_env.continuations import encode_prompts
    from lede_env.generate import Lede
    from lede_env.kernels import cpu_name
    from lede_env.model import get_bundle
    from lede_env.prompts import WIDE_EVAL, first_per_category, load_prompts

    b = get_bundle(None)
    prompts = first_per_category(load_prompts(args.prompts or WIDE_EVAL + "+context"), args.per_category)
    encoded = encode_prompts(b, prompts, args.max_new_tokens)
    hf = {"transformers generate": {}} | {f"transformers prompt lookup {n}": {"prompt_lookup_num_tokens": int(n)}
                                          for n in args.hf_lookup.split(",") if n}
    ledes = {}
    for m in (x.strip() for x in args.methods.split(";") if x.strip()):
        policy, _, ctx = m.partition("+ctx")
        ledes[m] = Lede(None, policy=policy, context_draft=int(ctx or 0))

    def transformers(kw):
        return lambda i, ids: time_transformers(b, ids, args.max_new_tokens, do_sample=False, **kw)

    def lede(x):
        return lambda i, ids: time_lede(x, ids, args.max_new_tokens)

    methods = {name: transformers(kw) for name, kw in hf.items()} | {f"lede {m}": lede(x) for m, x in ledes.items()}
    for name in hf:  # warm-up
        methods[name](0, encoded[0])
    for x in ledes.values():
        time_lede(x, encoded[0], 4)
    tallies = paired([(p.category, ids) for p, ids in zip(prompts, encoded)], methods, args.repeats)
    cats = categories(tallies)
    rows = []
    for m in labels(tallies):
        row = {"method": m}
        for c in cats:
            row[f"{c} vs AR"] = (tallies[(m, c)].speedup_over(tallies[("lede ar", c)])
                                 if ("lede ar", c) in tallies else float("nan"))
        s = tallies[(m, "all")]
        row["all tok/s"] = s.tokens_per_s
        row["vs transformers"] = s.speedup_over(tallies[("transformers generate", "all")])
        row["tokens/round"] = s.totals.tokens_per_round  # NaN (-) for transformers: rounds unseen
        row["identical"] = s.identical
        rows.append(row)
    write_report(args.out, f"Context drafts: wall clock on {cpu_name()}, {torch.get_num_threads()} threads, kernels "
                 f"{b.stack.kernels_tag}", args,
                 f"prompts: {len(prompts)} ({', '.join(cats[:-1])})\n\n{to_markdown(rows)}")


# --------------------------------------------------------------------------------------------
# kernels


def _kernels_args(ap):
    add_common(ap, None, 64, "runs/bench/kernels.md", device=False)
    ap.add_argument("--per-category", type=int, default=2, help="prompts per category")
    ap.add_argument("--kernels", default="blas,auto", help="kernel choices, comma-separated (the first is the reference)")
    ap.add_argument("--policies", default="ar,static:2,1,static:2,2,static:4,2",
                    help="lede policies (ar = one full-model step per token)")


def kernels(args) -> None:
    """The CPU kernel choice (``--kernels``; ``auto`` = the table measured on this machine,
    :mod:`lede_env.kernels`) under lede's AR loop and static self-speculation, beside
    ``transformers generate`` (torch's own kernels), greedy, a few ``DEFAULT_EVAL`` prompts per
    category: tokens/s per category, speedup over lede AR with the first choice and over
    transformers, and whether every output equals transformers' greedy tokens."""
    from lede_env.continuations import encode_prompts
    from lede_env.generate import Lede
    from lede_env.kernels import cpu_name
    from lede_env.model import get_bundle
    from lede_env.policies import split_policies
    from lede_env.prompts import DEFAULT_EVAL, first_per_category, load_prompts

    b = get_bundle(None)
    prompts = first_per_category(load_prompts(args.prompts or DEFAULT_EVAL), args.per_category)
    encoded = encode_prompts(b, prompts, args.max_new_tokens)
    choices = args.kernels.split(",")
    ledes = {p: Lede(None, policy=p) for p in split_policies(args.policies)}
    tables = {}
    for k in choices:
        b.stack.set_kernels(k)
        tables[k] = b.stack.kernels_tag

    def lede(k, x):
        def run(i, ids):
            if b.stack.kernels != k:
                b.stack.set_kernels(k)
            return time_lede(x, ids, args.max_new_tokens)
        return run

    methods = {"transformers generate": lambda i, ids: time_transformers(b, ids, args.max_new_tokens, do_sample=False)}
    methods |= {f"lede {'AR' if p == 'ar' else p} [{k}]": lede(k, x) for k in choices for p, x in ledes.items()}
    methods["transformers generate"](0, encoded[0])  # warm-up
    for k in choices:
        b.stack.set_kernels(k)
        for x in ledes.values():
            time_lede(x, encoded[0], 4)
    tallies = paired([(p.category, ids) for p, ids in zip(prompts, encoded)], methods, args.repeats)
    cats, ar_ref = categories(tallies), f"lede AR [{choices[0]}]"
    rows = []
    for m in labels(tallies):
        row = {"method": m}
        for c in cats:
            row[f"{c} tok/s"] = tallies[(m, c)].tokens_per_s
            row[f"{c} vs AR[{choices[0]}]"] = tallies[(m, c)].speedup_over(tallies[(ar_ref, c)])
        row["vs transformers (all)"] = tallies[(m, "all")].speedup_over(tallies[("transformers generate", "all")])
        row["identical"] = tallies[(m, "all")].identical if m != "transformers generate" else "-"
        rows.append(row)
    write_report(args.out, f"Kernel choices: wall clock on {cpu_name()}, {torch.get_num_threads()} threads", args,
                 "kernel tables (rows 1..9 | more): " + "; ".join(f"{k} = {t}" for k, t in tables.items())
                 + f"\n\n{to_markdown(rows)}")


# --------------------------------------------------------------------------------------------
# the live backend


def _live_env_args(ap):
    add_common(ap, "humaneval[0:4]", 64, "runs/bench/live_env.md")
    ap.add_argument("--eval-prompts", default="humaneval[24:32]", help="held-out prompts of the sampling comparison")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--static", default="2,1", help="E,K of the static policy")
    ap.add_argument("--trace-repeats", type=int, default=20, help="passes over the prompts for the trace env")
    ap.add_argument("--agent", default=None, help="exported agent folder (default: runs/demo/policy, else "
                                                  "runs/quickstart/policy)")


def steps_per_second(env, action: int, repeats: int) -> dict:
    """Steps and tokens per second of ``env`` playing ``action`` over its prompts ``repeats`` times."""
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


def live_env(args) -> None:
    """The live backend: 1. steps/s of ``LEDE-Llama3-v0`` (trace) against ``LEDE-Llama3-Live-v0``
    (greedy; sampled at ``--temperature``; sampled with wall-clock costs), a static (E, K) on
    ``--prompts``; 2. under sampling, per held-out prompt (seeded per prompt): lede's sampled AR
    loop (the reference), the static and the exported agent (skipped without one) against
    transformers' sampled ``generate``; 3. the same policies' throughput in the live env at that
    temperature (tokens per AR-step cost, cost profile and wall clock)."""
    set_device(args)
    import gymnasium as gym

    import lede_env  # noqa: F401 - registers the envs

    E, K = (int(x) for x in args.static.split(","))
    base = dict(prompts=args.prompts, max_new_tokens=args.max_new_tokens, progress=False)
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
    candidates = [args.agent] if args.agent else ["runs/demo/policy", "runs/quickstart/policy"]
    agent = next((p for p in candidates if Path(p, "policy.json").exists()), None)
    if agent is None:
        print(f"No exported agent ({' or '.join(candidates)}): skipping the sampling comparison; "
              "run `lede demo` first.")
        md2 = md3 = "(skipped: no exported agent)"
    else:
        names = {"sampled AR (lede loop)": "ar", f"static E={E},K={K}": f"static:{E},{K}", f"agent {agent}": agent}
        md2 = _live_env_sampled(args, names, agent)
        md3 = _live_env_throughput(args, names, agent)
    body = (f"## Steps per second ({args.prompts}, {args.max_new_tokens} tokens, static E={E},K={K})\n\n"
            f"{md1}\n\n## Under sampling at T={args.temperature} ({args.eval_prompts}): wall clock, "
            f"lede generate\n\n{md2}\n\n## Same policies in the live env at T={args.temperature} "
            f"(tokens per AR-step cost; the agent pays its observation overhead)\n\n{md3}")
    write_report(args.out, "The live backend", args, body)


def _live_env_sampled(args, names: dict, agent: str) -> str:
    """Wall clock under sampling: lede's policies ``names`` against transformers' sampled generate."""
    from lede_env.continuations import encode_prompts
    from lede_env.generate import Lede
    from lede_env.model import get_bundle
    from lede_env.prompts import load_prompts

    b = get_bundle(None)
    prompts = load_prompts(args.eval_prompts)
    encoded = encode_prompts(b, prompts, args.max_new_tokens)
    lede = Lede(None, policy=agent)
    pols = {n: lede.make_policy(p) for n, p in names.items()}

    def run_lede(pol):
        return lambda i, ids: time_lede(lede, ids, args.max_new_tokens, policy=pol, temperature=args.temperature,
                                        seed=i)

    def run_hf(i, ids):
        torch.manual_seed(i)
        r = time_transformers(b, ids, args.max_new_tokens, do_sample=True, temperature=args.temperature, top_p=1.0,
                              top_k=0)
        r.totals = plain_rounds(r.tokens)
        return r

    methods = {n: run_lede(pol) for n, pol in pols.items()} | {"transformers sampled": run_hf}
    time_lede(lede, encoded[0], 4)  # warm-up
    time_transformers(b, encoded[0], 4, do_sample=False)
    tallies = paired([(p.category, ids) for p, ids in zip(prompts, encoded)], methods, args.repeats)
    ar = tallies[("sampled AR (lede loop)", "all")]
    return to_markdown([{"method": n, "tokens_per_s": s.tokens_per_s, "speedup_vs_sampled_ar": s.speedup_over(ar),
                         "tokens_per_round": s.totals.tokens_per_round, "acceptance": s.totals.acceptance}
                        for n in methods for s in [tallies[(n, "all")]]])


def _live_env_throughput(args, names: dict, agent: str) -> str:
    """The policies ``names`` in the live env at ``--temperature``: tokens per AR-step cost."""
    import gymnasium as gym

    from lede_env.policies import policy_from_name
    from lede_env.task import settings_for

    rows = []
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
            rows.append({"cost": cost, "policy": n, "throughput_tokens_per_ar_step": tot.throughput})
        env.close()
    return to_markdown(rows)


# --------------------------------------------------------------------------------------------
# the agent against the best static


def _agent_vs_static_args(ap):
    from lede_env.prompts import DEFAULT_EVAL, DEFAULT_MAX_NEW, DEFAULT_TRAIN

    ap.add_argument("--train-prompts", default=DEFAULT_TRAIN)
    ap.add_argument("--eval-prompts", default=DEFAULT_EVAL, help="prompt spec, or 'wide' for WIDE_EVAL")
    ap.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW)
    ap.add_argument("--cost-profile", default="measured")
    ap.add_argument("--head-kind", default="affine-kl",
                    help="exit heads (lede_env.exits.HEAD_KINDS; affine-kl-prev: a round's first draft token also "
                         "reads the previous position's final hidden state)")
    ap.add_argument("--variants", default="compact/calibrated,full/none")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--live", type=int, default=0, help="held-out prompts per category decoded for real")
    ap.add_argument("--context-draft", type=int, default=0,
                    help="context-draft tokens on action 0 (prompt lookup; 0 = plain AR steps)")
    ap.add_argument("--context-lengths", default="",
                    help="copy lengths of the context actions, e.g. 1,2,3,4,6,8 (the agent picks one per round)")
    ap.add_argument("--obs-stat-exits", type=int, default=1,
                    help="compact observation: shallowest exits whose head statistics are observed (0: none, "
                         "no head call per round)")
    ap.add_argument("--context-agreement", type=int, default=0,
                    help="1: the context features also hold the matched n-gram's occurrences and how far their "
                         "continuations agree (lede_env.lookup.match_agreement)")
    ap.add_argument("--context-span", type=int, default=0,
                    help="1: the context features also hold the matched span (lede_env.lookup.match_span)")
    ap.add_argument("--context-datastore", type=int, default=0,
                    help="1: where the context has no match, context drafts come from the model's datastore of its "
                         "own text (lede_env.datastore)")
    ap.add_argument("--no-exits", action="store_true",
                    help="the agent chooses plain steps and context drafts only (trace_q exits=False)")
    ap.add_argument("--horizon", type=int, default=None,
                    help="trace_q targets over this many tokens (the action, then the best static; default: "
                         "trace_q's own)")
    ap.add_argument("--in-sample", action="store_true",
                    help="diagnostic: also train trace_q on the evaluation traces themselves (the most a learner "
                         "with this observation can get out of them; never a result to report as held out)")
    ap.add_argument("--more-traces", type=int, default=0, metavar="FOLDS",
                    help="also train on the datastore's extra text (879 prompts), split into FOLDS parts, each "
                         "traced against a store without its own text (agents.more_traces.fold_envs; needs "
                         "--context-datastore 1; 0: off)")
    ap.add_argument("--more-limit", type=int, default=None, help="with --more-traces: use only this many prompts")
    ap.add_argument("--extra-policies", default="",
                    help="more policy names for both tables (e.g. copy-else:8,2,0.35; see agents.evaluate)")
    ap.add_argument("--out", default="runs/bench_agent")


def agent_vs_static(args) -> None:
    """``trace_q`` agents trained on the training split's traces against the best static (E, K),
    DEL-style and AR, per prompt category, on held-out prompts (MT-bench categories included).
    Trace env: throughput = tokens / cost (AR-step units of the measured cost profile); the best
    static exit draft (E >= 1) beside the best static overall; with context drafts, the oracle
    over the action set without them. ``--live N``: the first N held-out prompts of each category
    decoded for real (:func:`agents.evaluate.live_eval`: speedup over lede's AR loop, outputs
    checked identical to greedy AR, transformers and its prompt lookup beside). Variants are
    OBSERVATION/STOP pairs: ``compact`` (running acceptance + the shallowest exit's statistics)
    or ``full`` (hidden-state context + every exit's statistics); stop ``calibrated`` (in-round
    stop from calibrated draft probabilities) or ``none``. Results: ``trace_eval``/``live_eval``
    ``.csv/.md/.json`` and ``info.json`` in ``--out``."""
    from agents.evaluate import live_eval, trace_eval, write_results
    from agents.export import export_policy
    from agents.more_traces import fold_envs
    from agents.policies import best_static_action
    from agents.train import greedy_q_policy
    from agents.trace_q import train_trace_q
    from lede_env.env import LEDEEnv
    from lede_env.policies import GuardedPolicy, StaticPolicy
    from lede_env.prompts import WIDE_EVAL, first_per_category, load_prompts, write_prompt_file

    eval_prompts = WIDE_EVAL if args.eval_prompts == "wide" else args.eval_prompts
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lengths = tuple(int(x) for x in args.context_lengths.split(",") if x)
    common = dict(max_new_tokens=args.max_new_tokens, cost_profile=args.cost_profile, progress=False,
                  head_kind=args.head_kind,
                  context_draft=args.context_draft, context_lengths=lengths, obs_stat_exits=args.obs_stat_exits,
                  obs_context_agreement=bool(args.context_agreement), obs_context_span=bool(args.context_span),
                  context_datastore=bool(args.context_datastore))
    rows_all, live_all, info = [], [], {}
    for variant in args.variants.split(","):
        obs_kind, stop = variant.split("/")
        kw = dict(common, obs_kind=obs_kind, stop_rule=None if stop == "none" else stop)
        t0 = time.time()
        train_env = LEDEEnv(prompts=args.train_prompts, **kw)
        eval_env = LEDEEnv(prompts=eval_prompts, **kw, reward_lambda=train_env.reward_lambda)
        static_best, static_tp = best_static_action(train_env)
        more = fold_envs(train_env, folds=args.more_traces, limit=args.more_limit) if args.more_traces else []
        if more:
            info[variant] = {"more_traces": sum(len(e.playable) for e in more),
                             "more_tokens": sum(e.trace_set.traces[i].n for e in more for i in e.playable)}
        agent = train_trace_q(train_env, steps=args.steps, exits=not args.no_exits, more_envs=more,
                              **({} if args.horizon is None else {"horizon": args.horizon}))
        policy = greedy_q_policy(agent, train_env.observer.layout())
        E, K = train_env.actions.decode(static_best)
        info[variant] = info.get(variant, {}) | {"lambda": train_env.reward_lambda, "static": [E, K], "static_train_tp": static_tp,
                         "overhead_ar_steps": train_env.profile.overhead / train_env.profile.ar_step,
                         "train_seconds": round(time.time() - t0, 1), "trace_q": agent.info["iterations"][-1]}
        print(f"[{variant}] lambda {train_env.reward_lambda:.3f}, static E={E} K={K}, {info[variant]}", flush=True)
        copies = [f"static:0,{m}" for m in lengths]  # every fixed copy length, for reference
        # the best static exit draft (E >= 1, whole K; LayerSkip's setting), chosen on training traces
        from lede_env.replay import best_static

        train_traces = [train_env.trace_set.traces[i] for i in train_env.playable]
        exit_best, exit_tp = best_static(train_traces, train_env.rules.without_overhead(), train_env.max_new_tokens,
                                         candidates=range(train_env.actions.first_exit_action, train_env.actions.n))
        Ex, Kx = train_env.actions.decode(exit_best)
        info[variant]["static_exit"] = [Ex, Kx, exit_tp]
        exit_name = f"static:{Ex},{Kx}"
        from lede_env.policies import split_policies

        extra = split_policies(args.extra_policies) if args.extra_policies else []
        names = ["ar", "static:best", *copies, exit_name, "del", *extra, "oracle"]
        policies = {f"trace_q ({variant})": GuardedPolicy(policy, fallback=static_best),
                    f"trace_q unguarded ({variant})": greedy_q_policy(agent, train_env.observer.layout())}
        if args.in_sample:
            for steps, hidden in ((args.steps, (64, 64)), (4 * args.steps, (256, 256))):
                fitted = train_trace_q(eval_env, steps=steps, hidden=hidden,
                                       **({} if args.horizon is None else {"horizon": args.horizon}))
                policies[f"trace_q fitted in-sample, {hidden[0]}x{hidden[1]}, {steps} steps ({variant})"] = \
                    greedy_q_policy(fitted, eval_env.observer.layout())
        if stop != "none":
            policies[f"static best + {stop} stop"] = StaticPolicy(static_best, stop_rule=eval_env.rules.stop)
            # the best static (E, K cap) when every round follows the stop rule, chosen on training traces
            capped, capped_tp = best_static(train_traces, train_env.rules.without_overhead(),
                                            train_env.max_new_tokens)
            Ec, Kc = train_env.actions.decode(capped)
            info[variant]["static_with_stop"] = [Ec, Kc, capped_tp]
            policies[f"static best with {stop} stop (E={Ec}, K<={Kc})"] = StaticPolicy(capped,
                                                                                      stop_rule=eval_env.rules.stop)
        rows = trace_eval(eval_env, names, static_best, policies=policies)
        if lengths or args.context_draft:  # the oracle over the action set without context drafts, beside
            plain = LEDEEnv(prompts=eval_prompts, **dict(kw, context_draft=0, context_lengths=(), context_datastore=False),
                            reward_lambda=train_env.reward_lambda)
            for r in trace_eval(plain, ["oracle"], None, by_category=True):
                rows.append(r | {"policy": "oracle without context drafts"})
        for r in rows:
            r["variant"] = variant
        rows_all += rows
        print(to_markdown([{k: r[k] for k in ("variant", "policy", "category", "throughput", "oracle_share",
                                              "tokens_per_round", "acceptance")} for r in rows]), flush=True)
        if args.live:
            folder = export_policy(agent, train_env, out / f"policy-{obs_kind}-{stop}", algo_name="trace_q")
            subset = write_prompt_file(first_per_category(load_prompts(eval_prompts), args.live), out / "live_prompts.jsonl")
            live_env = LEDEEnv(prompts=subset, **kw,
                               reward_lambda=train_env.reward_lambda)
            dec = live_env.make_decoder()
            fixed = [c for c in copies if c.endswith((",3", ",4"))]
            rows = live_eval(live_env, dec, ["ar", "hf", "hf-lookup:10", "static:best", *fixed, exit_name, "del", *extra,
                                             f"agent:{folder}",
                                             f"agent-unguarded:{folder}", "oracle"], static_best, progress=False)
            for r in rows:
                r["variant"] = variant
            live_all += rows
            print(to_markdown([{k: r[k] for k in ("variant", "policy", "category", "tokens_per_s", "speedup_vs_ar",
                                                  "tokens_per_round", "acceptance", "identical_to_ar",
                                                  "policy_ms_per_round")} for r in rows]), flush=True)
    write_results(out, "trace_eval", rows_all)
    if live_all:
        write_results(out, "live_eval", live_all)
    (out / "info.json").write_text(json.dumps(info, indent=2))
    print(f"results in {out}/")



# --------------------------------------------------------------------------------------------
# lede evaluate's harness, repeated


def _policies_args(ap):
    from lede_env.prompts import DEFAULT_EVAL, DEFAULT_TRAIN

    ap.add_argument("--policies", default="static:best,copy-else:8,2,0.2,copy-else:8,2,0.35",
                    help="policy names beside ar and oracle (agents.evaluate)")
    ap.add_argument("--head-kind", default=None, help="exit heads (default: the studied task's)")
    ap.add_argument("--train-prompts", default=DEFAULT_TRAIN, help="chooses lambda and static:best")
    ap.add_argument("--eval-prompts", default=DEFAULT_EVAL, help="held out")
    ap.add_argument("--per-category", type=int, default=2, help="held-out prompts per category decoded for real")
    ap.add_argument("--repeats", type=int, default=2, help="passes of the wall-clock evaluation")
    ap.add_argument("--out", type=Path, default=Path("runs/bench/policies.md"), help="Markdown report")


def policies(args) -> None:
    """``lede evaluate``'s harness on the studied task (:func:`lede_env.config.studied_task`: copies
    of 1-8 tokens, the datastore, the compact observation): ``static:best`` and lambda chosen on
    the training traces; every policy (with ``ar`` and ``oracle``) in the held-out trace env
    (:func:`agents.evaluate.trace_eval`), then on the clock (:func:`agents.evaluate.live_eval`:
    methods interleaved prompt by prompt, outputs checked identical to AR) ``--repeats`` times,
    each repeat's speedup over AR listed to show the spread."""
    import warnings
    from tempfile import TemporaryDirectory

    from agents.evaluate import live_eval, trace_eval
    from agents.policies import best_static_action
    from lede_env.config import studied_task
    from lede_env.env import LEDEEnv
    from lede_env.policies import split_policies
    from lede_env.prompts import first_per_category, load_prompts, write_prompt_file

    task = studied_task(**({} if args.head_kind is None else {"head_kind": args.head_kind}))
    names = ["ar", *split_policies(args.policies), "oracle"]
    with warnings.catch_warnings(), TemporaryDirectory() as tmp:
        warnings.simplefilter("ignore")
        train = LEDEEnv(task.replace(prompts=args.train_prompts), progress=False)
        static = best_static_action(train)[0]
        held = LEDEEnv(task.replace(prompts=args.eval_prompts, reward_lambda=train.reward_lambda), progress=False)
        trace_rows = trace_eval(held, names, static, by_category=False)
        subset = write_prompt_file(first_per_category(load_prompts(args.eval_prompts), args.per_category),
                                   Path(tmp) / "prompts.jsonl")
        env = LEDEEnv(task.replace(prompts=str(subset), reward_lambda=train.reward_lambda), progress=False)
        dec = env.make_decoder()
        runs = [live_eval(env, dec, names, static, progress=False, warmup=r == 0) for r in range(args.repeats)]
    rows = []
    for i, r0 in enumerate(runs[0]):
        sp = [run[i]["speedup_vs_ar"] for run in runs]
        rows.append({"policy": r0["policy"], "category": r0["category"],
                     "speedup vs AR, per repeat": " / ".join(f"{x:.3f}" for x in sp),
                     "mean": round(statistics.fmean(sp), 3),
                     "identical to AR": all(run[i]["identical_to_ar"] for run in runs),
                     "policy ms per round": round(statistics.fmean(run[i]["policy_ms_per_round"] for run in runs), 3)})
    trace_md = to_markdown([{k: r[k] for k in ("policy", "throughput", "tokens_per_round")} for r in trace_rows])
    write_report(args.out, "Policies, held out", args,
                 f"Trace env, held out ({task.heads.kind} heads):\n\n{trace_md}\n\n"
                 f"Wall clock, {args.per_category} held-out prompts per category, {args.repeats} repeats:\n\n"
                 + to_markdown(rows))


# --------------------------------------------------------------------------------------------
# vector-env


def _vector_env_args(ap):
    ap.add_argument("--env-id", default="LEDE-Llama3-v1")
    ap.add_argument("--num-envs", type=int, nargs="+", default=[1, 16, 64, 256, 1024])
    ap.add_argument("--seconds", type=float, default=5.0, help="target duration of each measurement")
    ap.add_argument("--threads", type=int, default=1, help="torch/numpy threads (the benchmark is single-process)")
    ap.add_argument("--out", type=Path, default=Path("runs/bench/vector_env.md"), help="Markdown report")


class _Autoresetting:
    """A vector env seen by ``gymnasium.utils.performance.benchmark_step`` (written for single
    envs): it resets sub-envs itself, so the helper's own reset is never due."""

    def __init__(self, venv) -> None:
        self.venv, self.action_space = venv, venv.action_space

    def reset(self, seed=None):
        return self.venv.reset(seed=seed)

    def step(self, action):
        obs, reward, _, _, info = self.venv.step(action)
        return obs, reward, False, False, info


def vector_env(args) -> None:
    """Random-action steps per second of one trace env, Gymnasium's sync and async vector envs
    (2 sub-envs) and lede's native vector env (``gym.make_vec(id, num_envs=N)``, the registered
    ``vector_entry_point``) for each N, measured with ``gymnasium.utils.performance.benchmark_step``
    in this process (aggregate env steps: calls x N), and the time the native env takes to build
    its round tables (once: they are cached on disk).

        python benchmarks/bench.py vector-env [--num-envs 1 16 64 256 1024] [--seconds 5]
    """
    import os

    import gymnasium as gym
    import torch
    from gymnasium.utils.performance import benchmark_step

    import lede_env  # noqa: F401 - registers the envs

    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    rows = []
    env = gym.make(args.env_id, progress=False)
    rows.append({"env": "gym.make (one env)", "num_envs": 1,
                 "steps/s": round(benchmark_step(env, target_duration=args.seconds, seed=0))})
    for mode in ("sync", "async"):
        venv = gym.make_vec(args.env_id, num_envs=2, vectorization_mode=mode, progress=False)
        calls = benchmark_step(_Autoresetting(venv), target_duration=args.seconds, seed=0)
        rows.append({"env": f"gym.make_vec {mode}", "num_envs": 2, "steps/s": round(calls * 2)})
        venv.close()
    from lede_env.vector_env import round_tables
    t0 = time.perf_counter()
    round_tables(env.unwrapped, cache=False)
    build = time.perf_counter() - t0
    for n in args.num_envs:
        venv = gym.make_vec(args.env_id, num_envs=n, progress=False)
        calls = benchmark_step(_Autoresetting(venv), target_duration=args.seconds, seed=0)
        rows.append({"env": "gym.make_vec (native)", "num_envs": n, "steps/s": round(calls * n)})
    write_report(args.out, "Steps per second", args,
                 to_markdown(rows) + f"\n\nThe native env's round tables (every round of every playable trace, "
                 f"cached on disk afterwards) built in {build:.1f} s; {torch.get_num_threads()} thread(s), {os.cpu_count()} CPUs.")


# --------------------------------------------------------------------------------------------
# trees


def _trees_args(ap):
    from lede_env.prompts import DEFAULT_EVAL

    ap.add_argument("--budgets", type=int, nargs="+", default=[2, 4, 8, 16], help="tree budgets (nodes) of the actions")
    ap.add_argument("--depth", type=int, default=8, help="longest branch of a tree (tokens)")
    ap.add_argument("--lambdas", type=float, nargs="+", default=[1.0, 1.5, 2.0, 3.0],
                    help="throughputs the static tree rule is tried at on the training traces")
    ap.add_argument("--eval-prompts", default=DEFAULT_EVAL, help="held out")
    ap.add_argument("--cost-profile", default=None, help="default: the registered task's (reference)")
    ap.add_argument("--clock-per-category", type=int, default=1,
                    help="held-out prompts per category decoded on the clock (0: trace env only)")
    ap.add_argument("--clock-max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2, help="paired passes over the clock's prompts")
    ap.add_argument("--hf-lookup", default="4,10", help="transformers prompt_lookup_num_tokens values")
    ap.add_argument("--agent-seeds", type=int, nargs="*", default=[],
                    help="also train trace_q over these seeds, on the training traces, with and without the tree "
                         "actions, and evaluate it held out in the trace env (none: skip)")
    ap.add_argument("--agent-steps", type=int, default=3000, help="trace_q's Adam steps")
    ap.add_argument("--out", type=Path, default=Path("runs/bench/trees.md"), help="Markdown report")


def tree_envs(budgets, depth: int, eval_prompts: str, cost_profile: Optional[str] = None) -> tuple:
    """``(train, held)``: the registered task ``LEDE-Llama3-v1`` (shipped traces) with tree actions
    of ``budgets`` nodes and ``depth`` levels, on its training prompts and on ``eval_prompts``."""
    import warnings

    import gymnasium as gym

    import lede_env  # noqa: F401  (registers the task)

    kw = {"tree_budgets": tuple(budgets), "tree_depth": depth,
          **({} if cost_profile is None else {"cost_profile": cost_profile})}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return gym.make("LEDE-Llama3-v1", **kw).unwrapped, gym.make("LEDE-Llama3-v1", prompts=eval_prompts, **kw).unwrapped


def _totals(traces, rules, max_new_tokens: int, choose_for) -> dict:
    """``{category: [tokens, cost]}`` (and ``"all"``) of ``choose_for(trace) -> choose(g)``."""
    from lede_env.replay import rollout

    tot: dict = defaultdict(lambda: [0, 0.0])
    for t in traces:
        r = rollout(t, rules, max_new_tokens, choose_for(t))
        for key in (t.category, "all"):
            tot[key][0] += r["tokens"]
            tot[key][1] += r["cost"]
    return tot


def tree_rule_search(env, budgets, lambdas) -> tuple[int, float, float]:
    """The static tree rule's ``(budget, lambda, throughput)`` best on ``env``'s traces (a rule
    chosen on training traces, as ``static:best`` is)."""
    from dataclasses import replace

    from lede_env.trees import TreePrune

    traces, rules = env.static_setting()
    best = (0, 0.0, -1.0)
    for B in budgets:
        for lam in lambdas:
            r = replace(rules, tree_prune=TreePrune.from_profile(rules.profile, B, lam, rules.reuse))
            n, c = _totals(traces, r, env.max_new_tokens, lambda t, a=env.actions.encode_tree(B): lambda g: a)["all"]
            if n / c > best[2]:
                best = (B, lam, n / c)
    return best


def tree_table(held, static_best: int, rule: tuple[int, float]) -> dict:
    """``{policy: {category: throughput}}`` on ``held``'s traces, overhead not charged (no policy
    here reads an observation), the whole K of an exit draft drafted (the static setting); the
    oracles also under the env's own in-round stop rule (what ``oracle_action`` plays)."""
    from dataclasses import replace

    from lede_env.mdp import ActionMap
    from lede_env.replay import oracle_plan
    from lede_env.trees import TreePrune

    traces, rules = held.static_setting()
    acts, T = held.actions, held.max_new_tokens

    def static(a):
        return lambda t: (lambda g: a)

    plays = {"AR": (rules, static(0)), "copy<=4": (rules, static(acts.encode(0, 4))),
             "copy<=8": (rules, static(acts.encode(0, 8)))}
    E, K = acts.decode(static_best)
    B = acts.tree_budget(static_best)
    plays[f"best static ({f'tree-{B}' if B else f'E={E}, K={K}' if E else f'copy<={K}' if K else 'AR'})"] = \
        (rules, static(static_best))
    for b in acts.tree_budgets:
        plays[f"tree-{b}"] = (rules, static(acts.encode_tree(b)))
    pruned = replace(rules, tree_prune=TreePrune.from_profile(rules.profile, rule[0], rule[1], rules.reuse))
    plays[f"tree rule (tree-{rule[0]}, lambda {rule[1]:g})"] = (pruned, static(acts.encode_tree(rule[0])))
    stop = held.rules.without_overhead()  # (the env's own in-round stop rule: exit drafts may end early)
    for label, base in (("", rules), (" (env's stop rule)", stop)):
        no_trees = replace(base, actions=ActionMap(acts.exit_layers, acts.k_max, acts.context_lengths))
        for name, r in ((f"oracle{label}, no trees", no_trees), (f"oracle{label}, + trees", base)):
            plays[name] = (r, lambda t, r=r: (lambda plan: (lambda g: int(plan[g])))(oracle_plan(t, r, T)[0]))
    return {name: {k: n / c for k, (n, c) in _totals(traces, r, T, pick).items()} for name, (r, pick) in plays.items()}


def trees(args) -> None:
    """Token-tree actions (issue 37; SuffixDecoding arXiv 2411.04975, SpecInfer arXiv 2305.09781)
    in the trace env of ``LEDE-Llama3-v1`` (shipped traces, reference costs unless
    ``--cost-profile``) with tree actions of ``--budgets`` nodes: trace-env throughput (tokens per
    AR-step cost, overhead not charged) per held-out category of AR, copy <= 4, copy <= 8, the best
    static action (any action, trees included, chosen on the training traces), each fixed tree,
    the static tree rule (:class:`lede_env.trees.TreePrune`: the largest prefix of the tree that
    pays; budget and lambda chosen on the training traces) and the hindsight oracles with and
    without tree actions, each as a ratio to copy <= 4. Deterministic.

    Then the same policies on the clock (:func:`tree_clock`): the decoder with tree verification
    beside transformers' generate and prompt lookup, paired prompt by prompt.

        python benchmarks/bench.py trees [--clock-per-category 1] [--repeats 2]"""
    import time as _time

    from lede_env.prompts import DEFAULT_TRAIN

    t0 = _time.perf_counter()
    train, held = tree_envs(args.budgets, args.depth, args.eval_prompts, args.cost_profile)
    static_best, static_tp = train.best_static()
    rule = tree_rule_search(train, train.actions.tree_budgets, args.lambdas)
    table = tree_table(held, static_best, rule[:2])
    cats = [c for c in dict.fromkeys(t.category for t in held.static_setting()[0])] + ["all"]
    base = table["copy<=4"]
    rows = [{"policy": name, **{c: f"{tp[c] / base[c]:.3f}" for c in cats}} for name, tp in table.items()]
    absolute = [{"policy": name, **{c: f"{tp[c]:.3f}" for c in cats}} for name, tp in table.items()]
    head = (f"Training traces ({DEFAULT_TRAIN}): best static action {train.actions.decode(static_best)} "
            f"(tree budget {train.actions.tree_budget(static_best)}), throughput {static_tp:.3f}; static tree rule: "
            f"tree-{rule[0]}, lambda {rule[1]:g}, throughput {rule[2]:.3f}. Held out: {args.eval_prompts}, "
            f"{len(held.static_setting()[0])} traces; {_time.perf_counter() - t0:.0f} s.")
    agents = tree_agents(args, train, held, static_best, rule[:2]) if args.agent_seeds else ""
    clock = tree_clock(args, held, static_best, rule[:2]) if args.clock_per_category else ""
    write_report(args.out, "Token trees in the trace env and on the clock, held out", args,
                 f"{head}\n\nTrace env, throughput relative to copy<=4:\n\n{to_markdown(rows)}\n\n"
                 f"Trace env, throughput (x AR):\n\n{to_markdown(absolute)}{agents}{clock}")


def tree_agents(args, train, held, static_best: int, rule: tuple[int, float]) -> str:
    """The agent table of ``trees``: ``trace_q`` (guarded by the best static action of the training
    traces, as exported agents are) trained over ``--agent-seeds`` on the training traces of the
    task with the tree actions, and of the task without them (``LEDE-Llama3-v1`` as registered),
    evaluated on ``held``'s traces by :func:`agents.evaluate.trace_eval` (the env's own rules: its
    in-round stop rule, overhead not charged) beside AR, copy <= 4, copy <= 8, the best static
    action, each tree and the tree rule, and the oracles of both action sets; throughput per
    category relative to copy <= 4, and the normalized score (0 = AR, 100 = the oracle with
    trees) with its 95 % interval over prompts and seeds."""
    import warnings

    import gymnasium as gym

    from agents.evaluate import trace_eval
    from agents.train import greedy_q_policy
    from agents.trace_q import train_trace_q
    from lede_env.policies import GuardedPolicy

    kw = {} if args.cost_profile is None else {"cost_profile": args.cost_profile}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain_train = gym.make("LEDE-Llama3-v1", **kw).unwrapped
        plain_held = gym.make("LEDE-Llama3-v1", prompts=args.eval_prompts, **kw).unwrapped
    agents, seconds = {}, {}
    for tag, tr in (("trees", train), ("no trees", plain_train)):
        best = tr.best_static()[0]
        t0 = time.time()
        agents[tag] = [GuardedPolicy(greedy_q_policy(train_trace_q(tr, steps=args.agent_steps, seed=s),
                                                     tr.observer.layout()), fallback=best)
                       for s in args.agent_seeds]
        seconds[tag] = (time.time() - t0) / len(args.agent_seeds)
    names = ["ar", "static:0,4", "static:0,8", "static:best", *[f"tree:{b}" for b in held.actions.tree_budgets],
             f"tree-rule:{rule[0]},{rule[1]:g}", "oracle"]
    rows = trace_eval(held, names, static_best, policies={"trace_q, + trees": agents["trees"]})
    plain = trace_eval(plain_held, ["oracle"], policies={"trace_q, no trees": agents["no trees"]})
    rows += [r | {"policy": "oracle, no trees" if r["policy"] == "oracle" else r["policy"],
                  "score": float("nan"), "score_ci": [float("nan")] * 2} for r in plain]
    base = {r["category"]: r["throughput"] for r in rows if r["policy"] == "static:0,4"}
    cats = list(dict.fromkeys(r["category"] for r in rows))
    table = []
    for pol in dict.fromkeys(r["policy"] for r in rows):
        by = {r["category"]: r for r in rows if r["policy"] == pol}
        row = {"policy": pol, **{c: f"{by[c]['throughput'] / base[c]:.3f}" for c in cats if c in by}}
        s = by["all"]
        row["score [95% CI]"] = ("-" if s["score"] != s["score"] else
                                 f"{s['score']:.1f} [{s['score_ci'][0]:.1f}, {s['score_ci'][1]:.1f}]")
        table.append(row)
    return (f"\n\nAgents ({len(args.agent_seeds)} seeds, {args.agent_steps} steps; training "
            f"{seconds['trees']:.0f} s a seed with trees, {seconds['no trees']:.0f} s without), trace env with the "
            f"env's stop rule, throughput relative to copy<=4; score: 0 = AR, 100 = the oracle with trees (the "
            f"rows 'no trees' unscored, their oracle is another):\n\n{to_markdown(table)}")


def time_decoder(dec, policy, ids: list[int], max_new_tokens: int) -> Run:
    """:meth:`lede_env.decoding.SelfSpeculativeDecoder.generate` with ``policy`` on ``ids``, timed
    by the decoder (prefill included), with its rounds."""
    res = dec.generate(torch.tensor([ids]), policy, max_new_tokens=max_new_tokens)
    return Run(res.seconds, list(res.tokens), res.totals, sum(r.policy_seconds for r in res.rounds))


def tree_clock(args, held, static_best: int, rule: tuple[int, float]) -> str:
    """The wall-clock table of ``trees``: ``--clock-per-category`` held-out prompts per category
    decoded by held's decoder (its rules: the task's, with the tree actions) under AR, copy <= 4,
    copy <= 8, each tree budget, the static tree rule and the best static action of the training
    traces, beside transformers' greedy generate and prompt lookup; methods interleaved prompt by
    prompt, ``--repeats`` times (:func:`paired`). Speedups over lede AR; every output compared with
    transformers' greedy tokens."""
    from lede_env.kernels import cpu_name
    from lede_env.policies import StaticPolicy, TreeRulePolicy
    from lede_env.trees import TreePrune

    dec, acts, b = held.make_decoder(), held.actions, held.bundle
    T = args.clock_max_new_tokens
    seen: dict = defaultdict(int)
    items = []
    for t in held.static_setting()[0]:
        if seen[t.category] < args.clock_per_category:
            seen[t.category] += 1
            items.append((t.category, t.prompt.tolist()))
    prune = TreePrune.from_profile(held.profile, rule[0], rule[1], held.rules.reuse)
    policies = {"lede ar": lambda: StaticPolicy(0), "lede copy<=4": lambda: StaticPolicy(acts.encode(0, 4)),
                "lede copy<=8": lambda: StaticPolicy(acts.encode(0, 8))}
    policies |= {f"lede tree-{B}": (lambda B=B: StaticPolicy(acts.encode_tree(B))) for B in acts.tree_budgets}
    policies[f"lede tree rule (tree-{rule[0]}, lambda {rule[1]:g})"] = lambda: TreeRulePolicy(acts, rule[0], prune)
    policies["lede best static of training"] = lambda: StaticPolicy(static_best)
    methods = {"transformers generate": lambda i, ids: time_transformers(b, ids, T, do_sample=False)}
    methods |= {f"transformers prompt lookup {n}": (lambda i, ids, n=int(n): time_transformers(
        b, ids, T, do_sample=False, prompt_lookup_num_tokens=n)) for n in args.hf_lookup.split(",") if n}
    methods |= {name: (lambda i, ids, make=make: time_decoder(dec, make(), ids, T)) for name, make in policies.items()}
    for run in methods.values():  # warm-up
        run(0, items[0][1][:32])
    tallies = paired(items, methods, args.repeats, reference="transformers generate")
    cats = categories(tallies)
    rows = []
    for m in labels(tallies):
        row = {"method": m}
        for c in cats:
            row[f"{c} vs AR"] = f"{tallies[(m, c)].speedup_over(tallies[('lede ar', c)]):.3f}"
        s = tallies[(m, "all")]
        row["vs copy<=4"] = f"{s.speedup_over(tallies[('lede copy<=4', 'all')]):.3f}"
        row["tok/s"] = f"{s.tokens_per_s:.1f}"
        row["tokens/round"] = s.totals.tokens_per_round
        row["identical"] = s.identical
        rows.append(row)
    return (f"\n\nWall clock on {cpu_name()}, {torch.get_num_threads()} thread(s), kernels {b.stack.kernels_tag}: "
            f"{len(items)} held-out prompts ({args.clock_per_category} per category), {T} new tokens, "
            f"{args.repeats} paired repeats:\n\n{to_markdown(rows)}")


# --------------------------------------------------------------------------------------------

SUBCOMMANDS = {  # name: (run, add its arguments, one line of help)
    "speed": (speed, _speed_args, "kernels, exit heads, bonus token, oracle replay against AR"),
    "generate": (generate, _generate_args, "Lede.generate against transformers' generate, greedy and sampled"),
    "context-draft": (context_draft, _context_draft_args, "context drafts against transformers' prompt lookup"),
    "kernels": (kernels, _kernels_args, "the CPU kernel choice under AR and self-speculation"),
    "live-env": (live_env, _live_env_args, "the live backend's steps/s; an agent under sampling"),
    "agent-vs-static": (agent_vs_static, _agent_vs_static_args, "a trace_q agent against the best static action"),
    "policies": (policies, _policies_args, "lede evaluate's harness, repeated, on the studied task"),
    "vector-env": (vector_env, _vector_env_args, "steps/s of single, Gymnasium-vectorised and native vector envs"),
    "trees": (trees, _trees_args, "token-tree actions in the trace env: fixed trees, the tree rule, oracles"),
}


def parser() -> argparse.ArgumentParser:
    """The command line: one subparser per entry of :data:`SUBCOMMANDS`, described by its docstring."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")
    for name, (run, add_args, help_line) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_line, description=run.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        add_args(p)
        p.set_defaults(run=run)
    return ap


def main(argv: Optional[list[str]] = None) -> None:
    args = parser().parse_args(argv)
    run = args.run
    del args.run
    run(args)


if __name__ == "__main__":
    main()
