"""Greedy continuations: the model's own greedy output for each prompt, cached per prompt.

Exit heads are fitted on them (:mod:`lede_env.calibration`) and traces are built from them
(:mod:`lede_env.traces`). Each continuation is cached as
``continuations/<model>/<max_new>/<hash of the prompt ids>.json`` under
:func:`~lede_env.storage.cache_dir`, written atomically, so any prompt set reuses every
continuation computed before for another set and an interrupted build resumes. The embedded
model's continuations of the default training and evaluation prompts (what ``lede demo`` decodes
first: 94 prompts, about 6 minutes on 2 CPU cores) ship with the package
(``lede_env/data/continuations/``, made by ``scripts/ship_continuations.py``, checksum in its
manifest) and fill the cache where it has no file.
"""

from __future__ import annotations

import functools
import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from tqdm.auto import tqdm

from .datastore import DatastoreSpec, NgramDatastore, build_datastore, cached_datastore, datastore_key
from .decoding import SelfSpeculativeDecoder, StaticPolicy
from .exits import ExitHeads
from .model import ModelBundle
from .prompts import Prompt, encode_prompt, load_prompts
from .storage import cache_dir, packaged_file, write_json_atomic

#: where the embedded model's shipped continuations live (``MANIFEST.json``: ``{"<model>/<max_new>":
#: {"file": name, "sha256": hex, ...}}``; each file: ``{"generated": {cache key: token ids}}``)
PACKAGED_CONTINUATIONS = Path(__file__).parent / "data" / "continuations"


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
        key = _cache_key(ids)
        path = folder / f"{key}.json"
        gen = None
        if use_cache and path.exists():
            try:
                gen = [int(t) for t in json.loads(path.read_text())["generated"]]
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                warnings.warn(f"Ignoring unreadable continuation cache {path}; rebuilding it.")
        if gen is None:
            shipped = shipped_continuations(bundle.slug, max_new_tokens).get(key) if use_cache else None
            gen = shipped if shipped is not None else greedy_decode(bundle, ids, max_new_tokens)
            if use_cache:
                write_json_atomic(path, {"id": p.id, "generated": list(map(int, gen))})
        eos = bool(gen) and gen[-1] in bundle.eos_ids
        out.append(Continuation(p.id, p.category, list(map(int, ids)), list(map(int, gen)), eos))
    return out


def _cache_key(ids: Sequence[int]) -> str:
    return hashlib.sha256(json.dumps(list(map(int, ids))).encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=8)
def shipped_continuations(slug: str, max_new_tokens: int) -> dict[str, list[int]]:
    """The continuations shipped for model ``slug`` (:attr:`ModelBundle.slug`) at
    ``max_new_tokens``, by cache key (the hash of the prompt's token ids); ``{}`` when none ship,
    or when the file fails its checksum (a warning: they are then decoded)."""
    path = packaged_file(PACKAGED_CONTINUATIONS, f"{slug}/{int(max_new_tokens)}", "continuations")
    if path is None:
        return {}
    return {k: [int(t) for t in v] for k, v in json.loads(path.read_text())["generated"].items()}


@torch.no_grad()
def batched_text(bundle: ModelBundle, prompts: Sequence[Prompt], max_new_tokens: int, batch_size: int = 32,
                 prompt_ids: Optional[Sequence[Sequence[int]]] = None, progress: bool = True,
                 use_cache: bool = True) -> list[Continuation]:
    """The model's greedy text for many prompts, decoded in left-padded batches by transformers'
    ``generate(do_sample=False)``: several times the tokens per second of one prompt at a time on
    a CPU (measured in ``docs/experiments.md``).

    Batching changes the float rounding, so on an exact near-tie a token may differ from
    :func:`get_continuations`'. That is harmless where the text is a source of drafts (the
    datastore, :mod:`lede_env.datastore`: the full model verifies every draft), and these never
    feed traces or exit heads, which need the decoder's own greedy tokens. Each continuation ends
    at its first EOS; it is cached per prompt under ``continuations/<model>/batched-<max_new>/``
    (written atomically), apart from the exact ones.

    Args:
        prompts: the prompts (chat template applied as in :func:`encode_prompts`).
        max_new_tokens: most tokens per continuation.
        batch_size: prompts per ``generate`` call (sorted by length, so little padding).
        prompt_ids: token ids per prompt; encoded from ``prompts`` when omitted (then a prompt
            too long for the model's context is left out, with a warning).
        use_cache: read/write the on-disk cache.

    Raises:
        ValueError: ``max_new_tokens`` or ``batch_size`` below 1.
    """
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"batched_text needs max_new_tokens >= 1 and batch_size >= 1, got {max_new_tokens} "
                         f"and {batch_size}.")
    if prompt_ids is None:  # a prompt too long for the model's context with max_new_tokens is left out
        encoded = []
        for p in prompts:
            try:
                encoded.append(encode_prompts(bundle, [p], max_new_tokens)[0])
            except ValueError:
                encoded.append(None)
        if any(x is None for x in encoded):
            warnings.warn(f"{sum(x is None for x in encoded)} of {len(prompts)} prompts leave no room for "
                          f"{max_new_tokens} new tokens in the model's context; their text is left out.")
        prompts = [p for p, x in zip(prompts, encoded) if x is not None]
        prompt_ids = [x for x in encoded if x is not None]
    ids = [list(map(int, x)) for x in prompt_ids]
    folder = cache_dir() / "continuations" / bundle.slug / f"batched-{max_new_tokens}"
    gen: dict[int, list[int]] = {}
    for i, x in enumerate(ids):
        path = folder / f"{_cache_key(x)}.json"
        if use_cache and path.exists():
            try:
                gen[i] = [int(t) for t in json.loads(path.read_text())["generated"]]
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                warnings.warn(f"Ignoring unreadable continuation cache {path}; rebuilding it.")
    todo = sorted((i for i in range(len(ids)) if i not in gen), key=lambda i: len(ids[i]))
    eos = set(bundle.eos_ids)
    pad = bundle.eos_ids[0] if bundle.eos_ids else 0
    model, device = bundle.model, bundle.stack.device
    batches = [todo[s:s + batch_size] for s in range(0, len(todo), batch_size)]
    for batch in tqdm(batches, desc=f"batched greedy text ({len(todo)} prompts)", disable=not progress):
        width = max(len(ids[i]) for i in batch)
        inp = torch.tensor([[pad] * (width - len(ids[i])) + ids[i] for i in batch], device=device)
        mask = torch.tensor([[0] * (width - len(ids[i])) + [1] * len(ids[i]) for i in batch], device=device)
        out = model.generate(input_ids=inp, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad, eos_token_id=list(eos) or None)
        for row, i in zip(out[:, width:].tolist(), batch):
            cut = next((j + 1 for j, t in enumerate(row) if t in eos), len(row))
            gen[i] = row[:cut]
            if use_cache:
                write_json_atomic(folder / f"{_cache_key(ids[i])}.json", {"id": prompts[i].id, "generated": gen[i]})
    return [Continuation(p.id, p.category, list(map(int, x)), gen[i], bool(gen[i]) and gen[i][-1] in eos)
            for i, (p, x) in enumerate(zip(prompts, ids))]


# ---- the model's datastore: built from its own greedy text ---------------------------------
def datastore_text(bundle: "ModelBundle", spec: DatastoreSpec = DatastoreSpec(), progress: bool = True,
                   use_cache: bool = True) -> list:
    """The text a store for ``spec`` is built from (:class:`~lede_env.continuations.Continuation`
    list): the model's greedy continuations of ``spec.calib_prompts`` (decoded once and cached,
    the same ones the exit heads are fitted on), then its batched greedy text of
    ``spec.extra_prompts`` (also cached per prompt; a one-off cost of minutes on a CPU for the
    default prompts, see ``docs/experiments.md``)."""
    conts = get_continuations(bundle, load_prompts(spec.calib_prompts), spec.calib_max_new_tokens,
                              progress=progress, use_cache=use_cache)
    if spec.extra_prompts:
        conts = conts + batched_text(bundle, load_prompts(spec.extra_prompts), spec.extra_max_new_tokens,
                                     progress=progress, use_cache=use_cache)
    return conts


def stored_text(bundle: "ModelBundle", spec: DatastoreSpec, store: NgramDatastore) -> Optional[tuple[list, list]]:
    """The text ``store`` was built from, read back as
    :class:`~lede_env.continuations.Continuation` lists ``(calibration, extra)`` (the prompts of
    ``spec.calib_prompts``, then of ``spec.extra_prompts``), or ``None`` when ``store`` is not the
    one ``spec`` builds (another number of sequences, or a sequence that does not start with its
    prompt's last ``spec.prompt_tail`` tokens). No decoding: each sequence is the continuation
    after those tokens (:func:`~lede_env.datastore.build_datastore`); the calibration ones are the exact greedy
    continuations the exit heads are fitted on, the extra ones batched text
    (:func:`~lede_env.continuations.batched_text`). ``eos`` is whether a continuation ends with
    one of the model's EOS ids."""
    calib_prompts = load_prompts(spec.calib_prompts)
    prompts = calib_prompts + (load_prompts(spec.extra_prompts) if spec.extra_prompts else [])
    if len(store.sequences) != len(prompts):
        return None
    eos = set(bundle.eos_ids)
    conts = []
    for j, (p, s) in enumerate(zip(prompts, store.sequences)):
        max_new = spec.calib_max_new_tokens if j < len(calib_prompts) else spec.extra_max_new_tokens
        try:
            ids = [int(t) for t in encode_prompts(bundle, [p], max_new)[0]]
        except ValueError:  # too long for the context: the store cannot hold it
            return None
        s = [int(t) for t in s]
        tail = ids[max(len(ids) - spec.prompt_tail, 0):]
        if s[:len(tail)] != tail:
            return None
        gen = s[len(tail):]
        conts.append(Continuation(p.id, p.category, ids, gen, bool(gen) and gen[-1] in eos))
    return conts[:len(calib_prompts)], conts[len(calib_prompts):]


def get_datastore(bundle: "ModelBundle", spec: DatastoreSpec = DatastoreSpec(), progress: bool = True,
                  use_cache: bool = True) -> NgramDatastore:
    """The model's datastore for ``spec``: the shipped one when the package has it (the embedded
    model's), else built from :func:`datastore_text` and cached under
    ``datastore/<model>/<hash>.npz``."""
    if use_cache:
        store = cached_datastore(bundle, spec)
        if store is not None:
            return store
    store = build_datastore(datastore_text(bundle, spec, progress, use_cache), spec)
    if use_cache:
        store.save(cache_dir() / "datastore" / f"{datastore_key(bundle, spec)}.npz")
    return store
