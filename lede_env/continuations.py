"""Greedy continuations: the model's own greedy output for each prompt, cached per prompt.

Exit heads are fitted on them (:mod:`lede_env.calibration`) and traces are built from them
(:mod:`lede_env.traces`). Each continuation is cached as
``continuations/<model>/<max_new>/<hash of the prompt ids>.json`` under
:func:`~lede_env.storage.cache_dir`, written atomically, so any prompt set reuses every
continuation computed before for another set and an interrupted build resumes.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from tqdm.auto import tqdm

from .decoding import SelfSpeculativeDecoder, StaticPolicy
from .exits import ExitHeads
from .model import ModelBundle
from .prompts import Prompt, encode_prompt
from .storage import cache_dir, write_json_atomic


@dataclass
class Continuation:
    """A prompt and the model's greedy continuation of it."""

    id: str
    category: str
    prompt_ids: list[int]
    generated: list[int]
    eos: bool


def encode_prompts(bundle: ModelBundle, prompts: Sequence[Prompt], max_new_tokens: int) -> list[list[int]]:
    """Token ids of each prompt (chat template when the tokenizer has one)."""
    ctx = getattr(bundle.model.config, "max_position_embeddings", None)
    limit = None if ctx is None else ctx - max_new_tokens - 16
    return [encode_prompt(bundle.tokenizer, p.text, max_length=limit).tolist() for p in prompts]


def greedy_decode(bundle: ModelBundle, ids: Sequence[int], max_new_tokens: int) -> list[int]:
    """Plain greedy continuation with lede's own loop (action 0 every round, the decoder's
    kernels), so traces share the live decoder's numerics. Equal to transformers'
    ``generate(do_sample=False)`` up to float rounding on exact near-ties (checked by the tests
    and reported by ``lede evaluate``)."""
    heads = ExitHeads(bundle.stack, (1,), "lens")
    dec = SelfSpeculativeDecoder(bundle.stack, heads, 1, bundle.eos_ids)
    return dec.generate(torch.tensor(list(ids)), StaticPolicy(0), max_new_tokens).tokens


def get_continuations(bundle: ModelBundle, prompts: Sequence[Prompt], max_new_tokens: int,
                      prompt_ids: Optional[Sequence[Sequence[int]]] = None, progress: bool = True,
                      use_cache: bool = True) -> list[Continuation]:
    """Greedy continuations (:func:`greedy_decode`), cached on disk one file per prompt (keyed
    by the prompt's token ids and ``max_new_tokens``), so any prompt set reuses every
    continuation computed before for another set.

    Args:
        prompt_ids: token ids per prompt; encoded from ``prompts`` when omitted.
        use_cache: read/write the on-disk cache (off for throw-away test models).
    """
    if prompt_ids is None:
        prompt_ids = encode_prompts(bundle, prompts, max_new_tokens)
    folder = cache_dir() / "continuations" / bundle.slug / str(max_new_tokens)
    out = []
    for p, ids in tqdm(list(zip(prompts, prompt_ids)), desc="greedy continuations", disable=not progress):
        k = hashlib.sha256(json.dumps(list(map(int, ids))).encode()).hexdigest()[:16]
        path = folder / f"{k}.json"
        gen = None
        if use_cache and path.exists():
            try:
                gen = [int(t) for t in json.loads(path.read_text())["generated"]]
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                warnings.warn(f"Ignoring unreadable continuation cache {path}; rebuilding it.")
        if gen is None:
            gen = greedy_decode(bundle, ids, max_new_tokens)
            if use_cache:
                write_json_atomic(path, {"id": p.id, "generated": list(map(int, gen))})
        eos = bool(gen) and gen[-1] in bundle.eos_ids
        out.append(Continuation(p.id, p.category, list(map(int, ids)), list(map(int, gen)), eos))
    return out
