"""Evaluation: policies in the trace env and driving the real decoder, in one process.

Policies are named by strings:

- ``ar`` - plain greedy, lede's loop with action 0 every round (the speed reference);
- ``hf`` - transformers' ``model.generate(do_sample=False)`` (wall clock only);
- ``hf-lookup:N`` - transformers' prompt lookup decoding,
  ``model.generate(do_sample=False, prompt_lookup_num_tokens=N)`` (wall clock only; compare
  with lede's context drafts, ``LEDEEnv(context_draft=N)``);
- ``hf-early-exit:E`` - transformers' own self-speculative decoding,
  ``model.generate(do_sample=False, assistant_early_exit=E)`` (LayerSkip's static baseline in
  transformers, arXiv 2404.16710; its default speculation-length schedule; wall clock only);
- ``static:E,K`` - a fixed (E, K); ``static:best`` - the best static action on training traces;
- ``heuristic:E`` - transformers' +2/-1 speculation-length schedule at exit E;
- ``confidence:E,K,THRESHOLD`` - confidence-threshold drafting from exit E, at most K tokens;
- ``copy-else:M,E,THRESHOLD`` - copy up to M tokens where the context or datastore has a draft,
  else one exit-E draft token, dropped below THRESHOLD (:class:`lede_env.policies.CopyElseDraftPolicy`);
- ``del`` - DEL-style dynamic exit and length from running acceptance estimates;
- ``tree:B`` - a token tree of at most B nodes every round (the env's ``tree_budgets`` must hold B);
  ``tree-rule:B,LAMBDA`` - the same tree pruned to what pays at throughput LAMBDA
  (:class:`lede_env.policies.TreeRulePolicy`, :class:`lede_env.trees.TreePrune`);
- ``oracle`` - the dynamic-programming oracle (in the decoder: its plan replayed);
- ``agent:PATH`` - an exported policy folder.

Every metric is defined once, in :mod:`lede_env.metrics`. Trace-env metrics: throughput = round
tokens / round cost (AR-step units), its share of the oracle's, mean return, tokens per round,
acceptance. Decoder metrics: wall-clock tokens/s, speedup vs ``ar`` (tokens/s ratio over the same
prompts, methods interleaved prompt by prompt), tokens per round, acceptance, the mean round cost
predicted by the cost profile and measured (AR-step units), exit-layer histogram, and whether
the tokens equal greedy AR's. Undefined values (AR's acceptance) are NaN, printed ``-``.
"""

from __future__ import annotations

import csv
import io
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from lede_env.config import TaskConfig
from lede_env.decoding import PlanPolicy, SelfSpeculativeDecoder, StaticPolicy, greedy_reference
from lede_env.metrics import RoundTotals, speedup, tokens_per_second
from lede_env.device import synchronize
from lede_env.episodes import play_episode
from lede_env.replay import oracle_plan, rollout, throughput

from lede_env.policies import POLICY_NAMES, policy_from_name

from .scores import RESAMPLES
from .store import reference_returns

from .tables import format_cell, to_markdown  # noqa: F401 - both still importable from here


def hf_early_exit(name: str, num_layers: int) -> Optional[int]:
    """The exit layer E of a ``hf-early-exit:E`` policy name (``None`` for other names).

    Raises:
        ValueError: E is not an integer in 1..L-1.
    """
    if not name.startswith("hf-early-exit:"):
        return None
    arg = name.split(":", 1)[1]
    if not arg.strip().isdigit() or not 1 <= int(arg) <= num_layers - 1:
        raise ValueError(f"{name!r}: give the exit layer as an integer in 1..{num_layers - 1}, e.g. hf-early-exit:4.")
    return int(arg)


def hf_lookup(name: str) -> Optional[int]:
    """The ``prompt_lookup_num_tokens`` of a ``hf-lookup:N`` policy name (``None`` for other names).

    Raises:
        ValueError: N is not an integer >= 1.
    """
    if not name.startswith("hf-lookup:"):
        return None
    arg = name.split(":", 1)[1]
    if not arg.strip().isdigit() or int(arg) < 1:
        raise ValueError(f"{name!r}: give the copied tokens as an integer >= 1, e.g. hf-lookup:10.")
    return int(arg)


def is_transformers_baseline(name: str) -> bool:
    """``hf``, ``hf-lookup:N`` and ``hf-early-exit:E`` run transformers' ``generate`` (wall clock only)."""
    return name == "hf" or name.startswith(("hf-early-exit:", "hf-lookup:"))


def _hf_kwargs(name: str, num_layers: int) -> dict:
    """The extra ``generate`` arguments of a transformers baseline's name."""
    E, N = hf_early_exit(name, num_layers), hf_lookup(name)
    return {"assistant_early_exit": E} if E is not None else {"prompt_lookup_num_tokens": N} if N else {}


def make_policy(name: str, env, static_best: Optional[int] = None):
    """Build the policy named ``name`` for ``env`` (``None`` for ``oracle``, ``hf`` and
    ``hf-early-exit:E``, which are handled by the callers); ``static:best`` plays
    ``static_best``, the other names go to :func:`agents.policies.policy_from_name`.

    Raises:
        ValueError: an unknown policy name or bad arguments.
    """
    u = env.unwrapped
    if name == "static:best":
        if static_best is None:
            raise ValueError("static:best needs the best static action (chosen on training traces).")
        return StaticPolicy(static_best)
    if is_transformers_baseline(name):
        _hf_kwargs(name, u.trace_set.num_layers)  # checks E / N
        return None
    if name == "oracle":
        return None
    pol = policy_from_name(name, u.actions, u.profile, u.rules.bonus, u.rules.reuse, u.observer)
    if pol is None:
        raise ValueError(f"Unknown policy {name!r}; use {POLICY_NAMES}, static:best, hf, hf-lookup:N, hf-early-exit:E "
                         "or oracle.")
    return pol


def label(name: str, env, static_best: Optional[int]) -> str:
    if name.startswith("hf-early-exit:"):
        return f"transformers assistant_early_exit={name.split(':', 1)[1]}"
    if name.startswith("hf-lookup:"):
        return f"transformers prompt_lookup_num_tokens={name.split(':', 1)[1]}"
    if name == "static:best" and static_best is not None:
        B = env.unwrapped.actions.tree_budget(static_best)
        if B:
            return f"static best (tree of <= {B} nodes)"
        E, K = env.unwrapped.actions.decode(static_best)
        if E:
            return f"static best (E={E}, K={K})"
        return f"static best (context draft <= {K})" if K else "static best (AR)"
    return name


def trace_eval(env, names: list[str], static_best: Optional[int] = None, by_category: bool = True,
               policies: Optional[dict] = None, intervals: bool = True) -> list[dict]:
    """Every policy on every playable trace of ``env`` (once each, in order).

    Args:
        names: policy names (see the module docstring).
        by_category: also give one row per policy and prompt category (when there are several).
        policies: more policies as ``{label: policy}`` (e.g. a trained agent before export), or
            ``{label: [policy, ...]}``, one per training seed: their episodes pool into one row,
            and the score's interval resamples seeds as well as prompts.
        intervals: give each score its 95 % stratified-bootstrap interval (:mod:`agents.scores`).

    Returns:
        one row per policy (``category == "all"``), then per policy and category:
        ``policy``, ``category``, ``score`` (normalized: 0 = always-AR, 100 = the oracle, on these
        prompts: :func:`agents.scores.group_score`), ``score_ci`` (``[low, high]``, or NaNs),
        ``throughput`` (tokens per AR-step unit), ``oracle_share`` (throughput / the oracle's on
        the same traces), ``mean_return``, ``tokens_per_round``, ``acceptance`` (NaN when nothing
        was drafted), as :mod:`lede_env.metrics` defines them; ``score_iqm``: in ``all`` rows the
        interquartile mean of the category scores (NaN with one category, and in category rows).
    """
    from .scores import scores_with_intervals

    u = env.unwrapped
    cats = [u.trace_set.traces[i].category for i in u.playable]
    groups = {"all": list(range(len(cats)))}
    if by_category and len(set(cats)) > 1:
        for c in sorted(set(cats)):
            groups[c] = [j for j, x in enumerate(cats) if x == c]
    rules = u.rules.without_overhead()
    oracle = [rollout(t, rules, u.max_new_tokens, lambda g, plan=oracle_plan(t, rules, u.max_new_tokens)[0]: int(plan[g]))
              for t in (u.trace_set.traces[i] for i in u.playable)]
    ref_ar, ref_oracle = reference_returns(u)
    per_policy = {}
    for name in names:
        if is_transformers_baseline(name):
            make_policy(name, env, static_best)  # checks the name
            continue
        pol = make_policy(name, env, static_best)
        with u.playing(pol):
            per_policy[label(name, env, static_best)] = [run_episodes(u, pol)]
    for lab, pols in (policies or {}).items():
        per_policy[lab] = []
        for pol in (pols if isinstance(pols, (list, tuple)) else [pols]):
            with u.playing(pol):
                per_policy[lab].append(run_episodes(u, pol))
    scores = {lab: scores_with_intervals(np.array([r for _, r in runs]), ref_ar, ref_oracle,
                                         cats if by_category else ["all"] * len(cats),
                                         resamples=RESAMPLES if intervals else 0)
              for lab, runs in per_policy.items()}
    rows = []
    for cat, idx in groups.items():
        for lab, runs in per_policy.items():
            res = [run[0][j] for run in runs for j in idx]
            tot = RoundTotals(rounds=sum(r["rounds"] for r in res), tokens=sum(r["tokens"] for r in res),
                              drafted=sum(r["drafted"] for r in res), accepted=sum(r["accepted"] for r in res),
                              cost=sum(r["cost"] for r in res))
            score, lo, hi = scores[lab][cat]
            row = {"policy": lab, "category": cat, "score": score, "score_ci": [lo, hi], "throughput": tot.throughput,
                   "oracle_share": tot.throughput / throughput([oracle[j] for j in idx]),
                   "mean_return": float(np.mean([run[1][j] for run in runs for j in idx])),
                   "tokens_per_round": tot.tokens_per_round, "acceptance": tot.acceptance,
                   "score_iqm": scores[lab].get("iqm", (float("nan"),))[0] if cat == "all" else float("nan")}
            rows.append(row)
    return rows


def run_episodes(u, pol):
    """One episode per playable trace of env ``u`` with ``pol`` (``None`` = the env's oracle),
    each reset with ``seed=0`` (:func:`lede_env.episodes.play_episode`).

    Returns:
        ``(results, returns)``: per episode ``{"tokens", "cost", "rounds", "accepted", "drafted"}``
        (:class:`lede_env.metrics.RoundTotals`' sums: ``tokens`` are the rounds', the prefill's
        token excluded) and the undiscounted return.
    """
    results, returns = [], []
    for i in u.playable:
        ep = play_episode(u, pol, seed=0, options={"prompt_index": i})
        tot = ep.totals
        results.append({"tokens": tot.tokens, "cost": tot.cost, "rounds": tot.rounds, "accepted": tot.accepted,
                        "drafted": tot.drafted})
        returns.append(ep.ret)
    return results, returns


@dataclass
class LiveResult:
    """Accumulated wall-clock results of one method.

    Attributes:
        seconds: total wall-clock seconds, prefill included.
        tokens: all generated tokens (the prefill's included).
        totals: the rounds' sums (:class:`lede_env.metrics.RoundTotals`; empty for transformers
            baselines but ``hf``, whose rounds lede cannot see).
    """

    seconds: float = 0.0
    tokens: int = 0
    totals: RoundTotals = field(default_factory=RoundTotals)
    identical: bool = True
    exits: Counter = field(default_factory=Counter)
    policy_seconds: float = 0.0


def live_eval(env, decoder: SelfSpeculativeDecoder, names: list[str], static_best: Optional[int] = None,
              warmup: bool = True, progress: bool = True, by_category: bool = True,
              records: Optional[dict] = None) -> list[dict]:
    """Run every method on every trace prompt of ``env`` with the real decoder; methods are
    interleaved prompt by prompt so that machine noise hits them alike.

    Args:
        by_category: also give one row per method and prompt category (when there are several).
        records: if given, filled with ``{policy label: [{"prompt_id", "category", "tokens",
            "rounds": [RoundRecord dicts]}, ...]}`` (for plots; not for ``hf``).

    Returns:
        one row per method (``category == "all"``), then per method and category: ``policy``,
        ``category``, ``tokens_per_s``, ``speedup_vs_ar`` (tokens/s over ``ar``'s on the same
        prompts), ``tokens_per_round``, ``acceptance``, ``cost_per_round_predicted`` (mean round
        cost of the cost profile, AR-step units), ``cost_per_round_measured`` (mean round seconds
        over the seconds of ``ar``'s plain steps in the same rows), ``identical_to_ar``,
        ``exit_histogram``, ``policy_ms_per_round``; metrics as :mod:`lede_env.metrics` defines
        them, NaN where undefined (acceptance without drafts; round metrics of transformers
        baselines other than ``hf``, whose rounds lede cannot see; predicted costs without a
        cost profile).
    """
    from tqdm.auto import tqdm

    u = env.unwrapped
    if "ar" not in names:
        names = ["ar"] + names
    pols = {n: make_policy(n, env, static_best) for n in names}
    traces = [u.trace_set.traces[i] for i in u.playable]
    cats = sorted({t.category for t in traces})
    by_category = by_category and len(cats) > 1
    groups = ["all"] + (cats if by_category else [])
    res = {(n, c): LiveResult() for n in names for c in groups}
    rules = u.rules.without_overhead()
    plans = {t.id: oracle_plan(t, rules, u.max_new_tokens)[0] for t in traces} if "oracle" in names else {}
    if warmup:
        decoder.generate(torch.tensor(traces[0].prompt), StaticPolicy(0), 8)
    for t in tqdm(traces, desc="live decoding", disable=not progress):
        prompt = torch.tensor(t.prompt)
        ref: Optional[list[int]] = None
        for n in names:
            rs = [res[(n, "all")]] + ([res[(n, t.category)]] if by_category else [])
            if is_transformers_baseline(n):
                toks = _time_baseline(n, decoder, prompt, u, rs)
            else:
                pol = PlanPolicy(plans[t.id]) if n == "oracle" else pols[n]
                out = _time_lede(decoder, prompt, pol, u.max_new_tokens, rs)
                toks = out.tokens
                if records is not None:
                    records.setdefault(label(n, env, static_best), []).append(
                        {"prompt_id": t.id, "category": t.category, "tokens": list(toks),
                         "rounds": [x.as_dict() for x in out.rounds]})
            if n == "ar":
                ref = toks
            for r in rs:
                r.identical &= toks == ref
    return _live_rows(res, groups, names, env, static_best, decoder.profile is not None)


def _time_baseline(name: str, decoder: SelfSpeculativeDecoder, prompt: torch.Tensor, u,
                   results: list[LiveResult]) -> list[int]:
    """Generate from ``prompt`` with the transformers baseline ``name``, timed; add the time and
    tokens (and for ``hf``, its AR rounds) to each of ``results``; the tokens."""
    kw = _hf_kwargs(name, u.trace_set.num_layers)
    synchronize(decoder.stack.device)
    t0 = time.perf_counter()
    toks = greedy_reference(decoder.stack.model, prompt, u.max_new_tokens, decoder.eos_ids, **kw)
    synchronize(decoder.stack.device)
    dt = time.perf_counter() - t0
    for r in results:
        r.seconds += dt
        r.tokens += len(toks)
        if name == "hf":  # plain greedy: one AR round per token after the prefill's, untimed
            r.totals += RoundTotals(rounds=max(len(toks) - 1, 0), tokens=max(len(toks) - 1, 0),
                                    cost=float("nan"), seconds=float("nan"))
    return toks


def _time_lede(decoder: SelfSpeculativeDecoder, prompt: torch.Tensor, pol, max_new_tokens: int,
               results: list[LiveResult]):
    """Generate from ``prompt`` with lede's decoder and policy ``pol``; add its time, tokens,
    rounds, policy time and exit layers to each of ``results``; the decoder's output."""
    out = decoder.generate(prompt, pol, max_new_tokens)
    for r in results:
        r.seconds += out.seconds
        r.tokens += len(out.tokens)
        r.totals += out.totals
        r.policy_seconds += sum(x.policy_seconds for x in out.rounds)
        r.exits.update(x.exit_layer for x in out.rounds)
    return out


def _live_rows(res: dict, groups: list[str], names: list[str], env, static_best: Optional[int],
               profiled: bool) -> list[dict]:
    """:func:`live_eval`'s rows from its results ``{(name, group): LiveResult}``, by group, then by
    method (``profiled``: the decoder has a cost profile, which predicts round costs)."""
    rows = []
    for c in groups:
        ar = res[("ar", c)]
        ar_step = ar.totals.ar_step_seconds  # lede's plain AR step on these prompts, measured alongside
        for n in names:
            r = res[(n, c)]
            t = r.totals
            rows.append({"policy": label(n, env, static_best), "category": c,
                         "tokens_per_s": tokens_per_second(r.tokens, r.seconds),
                         "speedup_vs_ar": speedup(r.tokens, r.seconds, ar.tokens, ar.seconds),
                         "tokens_per_round": t.tokens_per_round, "acceptance": t.acceptance,
                         "cost_per_round_predicted": t.cost_per_round if profiled else float("nan"),
                         "cost_per_round_measured": t.measured_cost_per_round(ar_step),
                         "identical_to_ar": r.identical,
                         "exit_histogram": dict(sorted(r.exits.items())),
                         "policy_ms_per_round": 1000 * r.policy_seconds / t.rounds if t.rounds else float("nan")})
    return rows


def held_out_envs(config: TaskConfig, train_prompts: str, eval_prompts: str, progress: bool = True,
                  stage=None) -> tuple:
    """The training env and the held-out evaluation env of ``lede evaluate`` and ``lede demo``.

    Args:
        config: the task both play (:class:`~lede_env.config.TaskConfig`; its ``prompts`` are
            replaced; a ``reward_lambda`` it fixes, e.g. an exported agent's, is kept by both).
        train_prompts: prompts whose traces choose lambda (reward and stop rule) and ``static:best``.
        eval_prompts: the held-out prompts (the caller checks they are disjoint from the others:
            :func:`lede_env.prompts.check_disjoint`).
        stage: ``stage(name) -> context manager`` around building each env (the demo times them:
            ``"traces + env (train)"``, ``"traces + env (eval)"``); ``None`` for none.

    Returns:
        ``(train_env, eval_env)``; the evaluation env takes the training env's ``reward_lambda``,
        never one from held-out traces.
    """
    from contextlib import nullcontext

    from lede_env.env import LEDEEnv

    stage = stage or (lambda name: nullcontext())
    with stage("traces + env (train)"):
        train_env = LEDEEnv(config.replace(prompts=train_prompts), progress=progress)
    with stage("traces + env (eval)"):
        eval_env = LEDEEnv(config.replace(prompts=eval_prompts, reward_lambda=train_env.reward_lambda),
                           progress=progress)
    return train_env, eval_env


@dataclass
class HeldOutEvaluation:
    """What :func:`evaluate_held_out` produced.

    Attributes:
        trace: :func:`trace_eval`'s rows.
        live: :func:`live_eval`'s rows (empty when not run).
        records: :func:`live_eval`'s per-prompt round records, keyed by the policies' labels
            before ``relabel`` (empty when not run).
        static_best: the action ``static:best`` played (``None`` if not asked for).
    """

    trace: list[dict]
    live: list[dict] = field(default_factory=list)
    records: dict = field(default_factory=dict)
    static_best: Optional[int] = None


def evaluate_held_out(train_env, eval_env, names: list[str], out: Path, prompts: str, *,
                      static_best: Optional[int] = None, live: bool = False, live_names: Optional[list[str]] = None,
                      live_env=None, bundle=None, heads=None, relabel=None, progress: bool = True, stage=None,
                      show=None) -> HeldOutEvaluation:
    """The evaluation of ``lede evaluate`` and ``lede demo``: ``static:best`` chosen on the
    training traces, every policy in the held-out trace env (:func:`trace_eval`), then, if
    ``live``, on the real decoder (:func:`live_eval`); tables written to ``out`` as they come
    (:func:`write_results`: ``trace_eval`` and ``live_eval`` ``.csv/.md/.json``), and the live
    rounds with their text (``records.json``, :func:`agents.report.save_records`) when the model
    has a tokenizer.

    Args:
        train_env, eval_env: from :func:`held_out_envs`.
        names: policy names (see the module docstring) for the trace env.
        prompts: the held-out prompt spec (named in ``records.json``).
        static_best: the action of ``static:best`` (default: chosen here on ``train_env``'s
            traces, :func:`agents.policies.best_static_action`, when ``names`` asks for it).
        live_names: the methods decoded for real (default: ``names``).
        live_env: the env whose prompts are decoded for real, or a function making it (called
            inside the live stage; default: ``eval_env``).
        bundle, heads: the model and exit heads of the decoder (``live_env.make_decoder``;
            default: those the env loaded).
        relabel: ``relabel(rows)`` edits the rows' policy labels in place before they are shown
            and written (the demo names its agent).
        stage: ``stage(name) -> context manager`` around the two evaluations
            (``"evaluate (trace env, held-out)"``, ``"evaluate (real decoder, held-out)"``).
        show: ``show(text)`` prints each table (Markdown); ``None`` prints nothing.

    Raises:
        ValueError: an unknown policy name or bad arguments (:func:`make_policy`).
    """
    from contextlib import nullcontext

    stage = stage or (lambda name: nullcontext())
    show = show or (lambda text: None)
    relabel = relabel or (lambda rows: None)
    if static_best is None and "static:best" in names + list(live_names or []):
        from .policies import best_static_action

        static_best, _ = best_static_action(train_env)
    res = HeldOutEvaluation(trace=[], static_best=static_best)
    with stage("evaluate (trace env, held-out)"):
        res.trace = trace_eval(eval_env, names, static_best)
        relabel(res.trace)
        write_results(out, "trace_eval", res.trace)
        show(to_markdown(res.trace))
    if not live:
        return res
    with stage("evaluate (real decoder, held-out)"):
        env = live_env() if callable(live_env) else (live_env or eval_env)
        dec = env.make_decoder(bundle, heads)
        res.live = live_eval(env, dec, live_names or names, static_best, progress=progress, records=res.records)
        relabel(res.live)
        write_results(out, "live_eval", res.live)
        tokenizer = (bundle or env.bundle).tokenizer
        if tokenizer is not None:
            from .report import save_records

            save_records(out, res.records, tokenizer, eval_env.actions.exit_layers, eval_env.actions.k_max, prompts)
        show(to_markdown(res.live))
    return res


def write_results(out_dir: Path, name: str, rows: list[dict]) -> None:
    """Write ``rows`` as ``NAME.csv``, ``NAME.md`` and ``NAME.json`` in ``out_dir``, each through
    :func:`lede_env.storage.atomic_file` (a killed process leaves each file old or new, whole)."""
    from lede_env.storage import write_text_atomic

    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / f"{name}.json", json.dumps(rows, indent=2, default=str))
    write_text_atomic(out_dir / f"{name}.md", to_markdown(rows) + "\n")
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    for r in rows:
        w.writerow({k: (json.dumps(v) if isinstance(v, dict) else v) for k, v in r.items()})
    write_text_atomic(out_dir / f"{name}.csv", buf.getvalue())


def log_to_wandb(mode: str, project: str, name: str, config: dict, tables: dict[str, list[dict]],
                 out_dir: Path) -> Optional[str]:
    """Log evaluation results to a W&B run: ``config``, every row list in ``tables`` as a
    ``wandb.Table``, and each policy's overall metrics in the run summary.

    Args:
        mode: ``"offline"`` (default of the CLI: written under ``out_dir/wandb``, uploaded later
            with ``wandb sync``), ``"online"`` or ``"disabled"`` (nothing logged).

    Returns:
        the run's folder (``None`` when disabled).

    Raises:
        ValueError: an unknown mode.
    """
    if mode not in ("offline", "online", "disabled"):
        raise ValueError(f"wandb mode must be 'offline', 'online' or 'disabled', got {mode!r}.")
    if mode == "disabled":
        return None
    import os

    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    out_dir.mkdir(parents=True, exist_ok=True)
    run = wandb.init(project=project, name=name, config=config, mode=mode, dir=str(out_dir), job_type="evaluate",
                     reinit="finish_previous")
    try:
        for key, rows in tables.items():
            if not rows:
                continue
            cols = list(rows[0])
            run.log({key: wandb.Table(columns=cols, data=[[json.dumps(r[c]) if isinstance(r[c], dict) else r[c]
                                                           for c in cols] for r in rows])})
            for r in rows:
                if r.get("category", "all") == "all":
                    for c in cols:
                        if isinstance(r[c], (int, float)) and not isinstance(r[c], bool):
                            run.summary[f"{key}/{r['policy']}/{c}"] = r[c]
        return run.dir
    finally:
        run.finish()


def policy_throughput(env, policy) -> float:
    """Throughput (tokens / cost) of ``policy`` over all of ``env``'s playable traces."""
    from lede_env.replay import throughput

    return throughput(run_episodes(env.unwrapped, policy)[0])
