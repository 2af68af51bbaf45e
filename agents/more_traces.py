"""More training traces: the datastore's own text, each fold traced against a store without it.

A learner over a rich observation (the hidden-state context of the ``full`` kind) needs far more
training positions than the training split's 64 prompts give: fitted on the evaluation traces
themselves it beats the best static action, trained on the training split it loses to it
(``docs/experiments.md``, "A datastore five times larger"). Every other prompt lede ships is spent on the model's
datastore (:data:`~lede_env.prompts.DATASTORE_EXTRA`), whose text the copy drafts come from: a
trace of one of those prompts replayed against the shipped store would find its own
continuation there and copy it whole, a leak no user's prompt enjoys.

:func:`fold_envs` uses that text anyway, without the leak, as cross-fitting does: the extra
prompts are split into ``folds`` parts; the traces of part k are replayed against a store built
from the calibration text and the *other* parts only (3/4 of the shipped store's text with 4
folds, so its drafts are a little weaker than the shipped store's, never stronger). Their text
is the store's own (:func:`~lede_env.datastore.stored_text` reads it back from the shipped store;
else :func:`~lede_env.continuations.datastore_text` decodes it, cached per prompt: batched greedy
decoding for the extra prompts); each continuation is cut at its first token that is not
the full model's argmax after the tokens before it (:func:`lede_env.traces.trace_one`'s
``exact_prefix``), so every trace is exact greedy decoding.

Fold stores and traces are cached under ``folds/<model>/<key>/`` (written atomically; the key
covers the model, the exit heads, the store spec and its prompts, the folds and the length).
"""

from __future__ import annotations

import hashlib
import warnings
from typing import Optional, Sequence

import numpy as np

from lede_env.continuations import Continuation
from lede_env.continuations import datastore_text, stored_text
from lede_env.datastore import DatastoreSpec, NgramDatastore, build_datastore, datastore_key, spec_for
from lede_env.prompts import load_prompts
from lede_env.storage import cache_dir
from lede_env.traces import TraceSet, build_traces, load_traces, save_traces

#: Settings of the primary env's task config that :func:`fold_envs` sets itself.
_OWN_KEYS = ("prompts", "trace_set", "heads", "bundle", "profile", "eos_ids", "reward_lambda", "context_datastore",
             "cost_profile", "progress", "backend", "model", "device", "dtype")


def fold_envs(env, folds: int = 4, limit: Optional[int] = None, min_tokens: int = 16,
              seed: int = 0, progress: bool = True) -> list:
    """Trace envs over the datastore's extra text, fold ``k`` replayed against a store without it.

    Args:
        env: the primary trace env (trace backend, with datastore drafts, that loaded its model:
            its exit heads, cost profile, lambda and store spec are used).
        folds: parts the extra prompts are split into (>= 2): each part's store holds the others'.
        limit: use only this many extra prompts (a seeded random choice; ``None``: all).
        min_tokens: drop traces shorter than this (tokens) after the exact-prefix cut.
        seed: seeds the choice and the split.

    Returns:
        ``folds`` trace envs of ``env``'s task (its ``task_config``: actions, observation layout,
        rules) and lambda, each
        with its own traces and store: give them to :func:`agents.trace_q.train_trace_q` as
        ``more_envs``.

    Raises:
        ValueError: ``folds`` < 2, or an env without datastore drafts, without its model loaded, or
            whose store has no extra text (a custom calibration set: its text is the heads' own).
    """
    from lede_env.env import LEDEEnv

    u = env.unwrapped
    if folds < 2:
        raise ValueError(f"folds={folds}: give 2 or more (each fold's store holds the other folds' text).")
    if getattr(u, "bundle", None) is None or u.heads is None or u.rules.datastore is None:
        raise ValueError("fold_envs needs a trace env that loaded its model and drafts from the datastore "
                         "(LEDEEnv(..., context_datastore=True, context_lengths=...), no prebuilt trace_set).")
    spec = spec_for(u.task_config.heads.calib_prompts)
    if not spec.extra_prompts:
        raise ValueError("This env's datastore holds only the calibration text (a custom calib_prompts): there "
                         "is no extra text to trace; use the default calibration prompts.")
    bundle, heads = u.bundle, u.heads
    key = hashlib.sha256(repr((datastore_key(bundle, spec), heads.fingerprint(), folds, limit, min_tokens, seed,
                               u.max_new_tokens)).encode()).hexdigest()[:12]
    root = cache_dir() / "folds" / bundle.slug / key
    kw = {k: v for k, v in u.task_config.to_kwargs().items() if k not in _OWN_KEYS}
    split = None
    out = []
    for k in range(folds):
        folder = root / f"fold-{k}"
        try:
            ts, store = load_traces(folder), NgramDatastore.load(folder / "datastore.npz")
        except (FileNotFoundError, ValueError):
            if split is None:
                calib, extra = _store_text(bundle, spec, u.rules.datastore, progress)
                split = fold_split(calib, extra, spec, folds, u.max_new_tokens, seed, limit)
            store, conts = split[k]
            ts = build_traces(bundle, heads, conts, progress=progress, exact_prefix=True)
            ts = TraceSet([t for t in ts.traces if t.n >= min_tokens], ts.manifest)
            ts.manifest["fold"] = {"k": k, "folds": folds, "store_tokens": len(store), "prompts": spec.extra_prompts}
            save_traces(ts, folder)
            store.save(folder / "datastore.npz")
        with warnings.catch_warnings():  # cut traces end before max_new_tokens: episodes stop there
            warnings.simplefilter("ignore")
            out.append(LEDEEnv.with_objects(trace_set=ts, heads=heads, datastore=store, profile=u.profile,
                               eos_ids=tuple(u.rules.eos_ids), reward_lambda=u.reward_lambda, progress=False, **kw))
    return out


def fold_split(calib: Sequence[Continuation], extra: Sequence[Continuation], spec: DatastoreSpec, folds: int,
               max_new_tokens: int, seed: int = 0, limit: Optional[int] = None
               ) -> list[tuple[NgramDatastore, list[Continuation]]]:
    """Split ``extra`` into ``folds`` seeded parts: ``[(store, continuations)]`` per part, the store
    built (as ``spec`` says) from ``calib`` and every *other* part's text, the part's continuations
    cut to ``max_new_tokens`` (``eos`` kept only where the cut keeps the EOS).

    Args:
        limit: split only this many of ``extra`` (a seeded random choice; the others are in no
            part and in every store).

    Raises:
        ValueError: ``folds`` < 2 or more folds than continuations.
    """
    if not 2 <= folds <= len(extra):
        raise ValueError(f"folds={folds}: give 2 to {len(extra)} (one per continuation at most).")
    order = np.random.default_rng(seed).permutation(len(extra))
    if limit is not None:
        order = order[:limit]
    out = []
    for k in range(folds):
        mine = {int(i) for i in order[k::folds]}
        store = build_datastore(list(calib) + [c for i, c in enumerate(extra) if i not in mine], spec)
        conts = [Continuation(c.id, c.category, c.prompt_ids, c.generated[:max_new_tokens],
                              c.eos and len(c.generated) <= max_new_tokens)
                 for i, c in enumerate(extra) if i in mine]
        out.append((store, conts))
    return out


def _store_text(bundle, spec: DatastoreSpec, store: NgramDatastore, progress: bool) -> tuple[list, list]:
    """``(calibration text, extra text)``: read back from ``store``
    (:func:`~lede_env.datastore.stored_text`, no decoding), else the text a store for ``spec`` is
    built from (:func:`~lede_env.continuations.datastore_text`: decoded, cached per prompt)."""
    text = stored_text(bundle, spec, store)
    if text is not None:
        return text
    conts = datastore_text(bundle, spec, progress)
    n = len(load_prompts(spec.calib_prompts))
    return conts[:n], conts[n:]
