"""Traces: greedy continuations plus one teacher-forced pass, replaying SSD exactly.

Layers 1..E are causal and do not depend on later layers, so the token an exit-E draft
produces at position i, given an accepted prefix, equals the teacher-forced exit-E draft at
i. A trace therefore tells the accepted run length of any (E, K) at any position exactly,
and the trace environment replays greedy self-speculative decoding at microseconds a round
(the module docstring of :mod:`lede_env.replay` and the README's env section).

Everything built here is cached under :func:`~lede_env.storage.cache_dir`, written under a
temporary name and renamed when whole:

- ``continuations/<model>/<prompts>-<max_new>.json`` - greedy continuations;
- ``exits/<model>/<kind>-<hash>.safetensors`` - fitted exit heads (the hash covers the head spec and
  the calibration prompts' content);
- ``traces/<model>/<prompts>-<max_new>-<heads>/{traces.safetensors,manifest.json}``.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from . import __version__
from .exits import (ExitHeads, agreement, calibrate_acceptance, default_exit_layers, finetune_kl, fit_affine, rank_vocabulary,
                    teacher_forced)
from .device import dtype_tag, resolve_device, resolve_dtype
from .layers import LayerStack
from .model import describe_model, eos_token_ids, load_model, model_slug
from .storage import atomic_file, atomic_folder, cache_dir, write_json_atomic
from .prompts import (DEFAULT_CALIB, DEFAULT_CALIB_MAX_NEW, DEFAULT_MAX_NEW, DEFAULT_TRAIN, Prompt, encode_prompt, load_prompts,
                      prompts_fingerprint)
from .decoding import SelfSpeculativeDecoder, StaticPolicy

TRACE_FORMAT = 2


@dataclass
class ModelBundle:
    """A loaded model with everything the pipeline needs next to it."""

    name: str
    model: torch.nn.Module
    tokenizer: object
    stack: LayerStack
    eos_ids: tuple[int, ...]

    @property
    def slug(self) -> str:
        """Cache key of the model and its weight dtype: greedy continuations, exit heads, traces
        and cost profiles differ between fp32 and bf16 (``<model>`` for fp32, ``<model>@bf16``)."""
        tag = dtype_tag(self.stack.dtype)
        return model_slug(self.name) + ("" if tag == "fp32" else f"@{tag}")


_BUNDLES: dict[tuple, ModelBundle] = {}


def get_bundle(name: Optional[str] = None, device: Optional[str] = None, dtype: Optional[str] = None) -> ModelBundle:
    """Load (once per process) the model named ``name`` (``None`` = embedded default).

    Args:
        device: torch device (``None``: ``$LEDE_DEVICE`` or cpu; see
            :func:`~lede_env.device.resolve_device`).
        dtype: weight dtype (``None``: ``$LEDE_DTYPE``, else bf16 on CUDA, fp32 on CPU).

    Raises:
        FileNotFoundError, ValueError: as :func:`~lede_env.model.load_model`.
    """
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    key = (model_slug(name), str(dev), dt)
    if key not in _BUNDLES:
        model, tok = load_model(name, dtype=dt, device=dev)
        _BUNDLES[key] = ModelBundle(model_slug(name), model, tok, LayerStack(model), eos_token_ids(model, tok))
    return _BUNDLES[key]


def bundle_from_model(model, tokenizer=None, name: str = "custom") -> ModelBundle:
    """Wrap an already loaded model (e.g. a tiny test model) as a :class:`ModelBundle`."""
    return ModelBundle(name, model, tokenizer, LayerStack(model), eos_token_ids(model, tokenizer))


# ---- continuations --------------------------------------------------------------------------
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


# ---- exit heads -----------------------------------------------------------------------------
@dataclass
class HeadSpec:
    """What determines a set of exit heads (the cache key).

    Attributes:
        exit_layers: candidate exits (``None`` = every 2nd layer below L).
        kind: ``"lens"``, ``"affine"`` or ``"affine-kl"`` (see :mod:`lede_env.exits`).
        draft_vocab: truncated draft vocabulary size (``None`` = full vocabulary).
        feature_vocab: vocabulary of the observation features.
        calib_prompts: prompt spec whose greedy continuations fit the heads and rank the vocabulary.
        calib_max_new_tokens: continuation length for calibration.
        ridge: relative ridge strength of the affine fit.
        kl_steps: Adam steps of the KL fine-tune per exit (kind ``"affine-kl"`` only).
    """

    exit_layers: Optional[tuple[int, ...]] = None
    kind: str = "affine-kl"
    draft_vocab: Optional[int] = 8192
    feature_vocab: int = 1024
    calib_prompts: str = DEFAULT_CALIB
    calib_max_new_tokens: int = DEFAULT_CALIB_MAX_NEW
    ridge: float = 0.01
    kl_steps: int = 600


#: Version of the exit-head files (2: with the acceptance calibration); part of the cache key.
HEADS_FORMAT = 2
#: Exit heads shipped with the package (the embedded model's default heads; see
#: ``scripts/fit_default_heads.py``), listed with their checksums in ``MANIFEST.json``.
PACKAGED_HEADS = Path(__file__).parent / "data" / "heads"
#: Every ``HOLDOUT``-th calibration continuation is kept out of the head fit and calibrates the
#: acceptance estimate instead (a fit's own positions would make it overconfident).
HOLDOUT = 8


def heads_key(bundle: ModelBundle, spec: HeadSpec) -> tuple[str, tuple[int, ...]]:
    """``(key, exits)``: the cache key of the heads ``spec`` gives for ``bundle``
    (``<model>/<kind>-<hash>``; the hash covers every field of the spec, the calibration prompts'
    ids and texts (their fingerprint) and the file format)."""
    exits = tuple(spec.exit_layers) if spec.exit_layers else default_exit_layers(bundle.stack.num_layers)
    calib = prompts_fingerprint(load_prompts(spec.calib_prompts))
    tag = hashlib.sha256(repr((asdict(spec) | {"exit_layers": exits}, calib, HEADS_FORMAT)).encode()).hexdigest()[:12]
    return f"{bundle.slug}/{spec.kind}-{tag}", exits


def packaged_heads(key: str) -> Optional[Path]:
    """The shipped head file for cache key ``key``, if the package has one whose checksum matches
    its manifest (a mismatch warns and is ignored: the heads are then refitted)."""
    man = PACKAGED_HEADS / "MANIFEST.json"
    if not man.exists():
        return None
    entry = json.loads(man.read_text()).get(key)
    if entry is None:
        return None
    path = PACKAGED_HEADS / entry["file"]
    if not path.exists() or hashlib.sha256(path.read_bytes()).hexdigest() != entry["sha256"]:
        warnings.warn(f"Shipped exit heads {path} are missing or fail their checksum; refitting them.")
        return None
    return path


def get_heads(bundle: ModelBundle, spec: HeadSpec, progress: bool = True, use_cache: bool = True,
              calibration: Optional[Sequence[Continuation]] = None) -> ExitHeads:
    """Exit heads for ``spec``: the shipped ones when the package has them (the embedded model's
    defaults), else fitted on calibration continuations once and loaded from the cache after.

    The fit: the draft vocabulary is ranked on every calibration continuation; translators are
    fitted on all but every :data:`HOLDOUT`-th continuation, which calibrates the acceptance
    estimate (:func:`~lede_env.exits.calibrate_acceptance`) used to stop drafts inside a round.

    Args:
        calibration: continuations to fit on instead of ``spec.calib_prompts`` (tests).
    """
    key, exits = heads_key(bundle, spec)
    V = bundle.stack.head_weight.shape[0]
    draft_vocab = None if spec.draft_vocab is None or spec.draft_vocab >= V else spec.draft_vocab
    heads = ExitHeads(bundle.stack, exits, spec.kind, None, draft_vocab, spec.feature_vocab)
    needs_calib = spec.kind != "lens" or draft_vocab is not None or spec.feature_vocab < V
    if not needs_calib:
        return heads
    path = cache_dir() / "exits" / f"{key}.safetensors"
    if use_cache and calibration is None:
        for p in (packaged_heads(key), path):
            if p is None or not p.exists():
                continue
            try:
                heads.load_state(load_file(str(p)))
                return heads
            except Exception as e:  # noqa: BLE001 - a bad cache file is rebuilt, never trusted
                warnings.warn(f"Ignoring unreadable exit-head file {p} ({e}); refitting.")
    if calibration is None:
        calibration = get_continuations(bundle, load_prompts(spec.calib_prompts), spec.calib_max_new_tokens,
                                        progress=progress, use_cache=use_cache)
    heads.vocab_rank = rank_vocabulary(V, [c.generated for c in calibration])
    heads._refresh_vocab()
    seqs = [(torch.tensor(c.prompt_ids + c.generated), len(c.prompt_ids)) for c in calibration]
    held = seqs[HOLDOUT - 1::HOLDOUT] if len(seqs) >= HOLDOUT else []
    fit = [q for j, q in enumerate(seqs) if j % HOLDOUT != HOLDOUT - 1] if held else seqs
    if heads.translated:
        fit_affine(heads, fit, ridge=spec.ridge)
        if spec.kind == "affine-kl":
            finetune_kl(heads, fit, steps=spec.kl_steps)
    calibrate_acceptance(heads, held or seqs)
    if use_cache:
        _save_tensors_atomic(path, heads.state())
    return heads


def agreement_by_category(heads: ExitHeads, continuations: Sequence[Continuation]) -> dict[str, dict[int, float]]:
    """Top-1 agreement of each exit's draft token with the full model's greedy continuation,
    per prompt category (and ``"all"``), over continuation positions.

    Returns:
        ``{category: {exit_layer: agreement in [0, 1]}}``, categories in first-seen order.
    """
    groups: dict[str, list] = {}
    for c in continuations:
        groups.setdefault(c.category, []).append((torch.tensor(c.prompt_ids + c.generated), len(c.prompt_ids)))
    out = {cat: agreement(heads, seqs) for cat, seqs in groups.items()}
    # "all" weighs each category by its positions (one per generated token), so no sequence is
    # run through the model twice
    n = {cat: sum(ids.shape[0] - n_prompt for ids, n_prompt in seqs) for cat, seqs in groups.items()}
    total = sum(n.values())
    out["all"] = {e: (sum(out[c][e] * n[c] for c in groups) / total if total else math.nan) for e in heads.exit_layers}
    return out


def check_disjoint(**specs: str) -> None:
    """Raise ``ValueError`` naming the shared prompts if any two of the named prompt specs share a
    prompt text (calibration, training and evaluation prompts must be disjoint)."""
    texts = {name: {p.text: p.id for p in load_prompts(spec)} for name, spec in specs.items()}
    names = list(texts)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            shared = [texts[a][t] for t in texts[a].keys() & texts[b].keys()]
            if shared:
                raise ValueError(f"{len(shared)} prompt(s) are in both the {a} and the {b} prompts (e.g. "
                                 f"{sorted(shared)[:3]}): keep calibration, training and evaluation prompts disjoint.")


def _save_tensors_atomic(path: Path, tensors: dict[str, torch.Tensor], metadata: Optional[dict] = None) -> None:
    with atomic_file(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


# ---- traces ---------------------------------------------------------------------------------
@dataclass
class Trace:
    """One prompt's greedy continuation with, at each continuation position, what every exit
    would draft and the observation features.

    Local position ``j`` (0 <= j < N) is the position whose full-model output is ``generated[j]``
    (absolute position ``len(prompt) - 1 + j``).

    Attributes:
        id, category: the prompt's id and category.
        prompt: [P] int64 prompt ids.
        generated: [N] int64 greedy continuation (ends with EOS when ``eos``).
        eos: the continuation ended with EOS (else it stopped at ``max_new_tokens``).
        draft: [N, n_exits] int64 draft token of each exit at local position j.
        draft_prob: [N, n_exits] float32 draft-head probability of each draft token (the
            confidence compared with a stop threshold, see :class:`~lede_env.replay.ReplayRules`).
        top1, entropy: [N, n_exits] float32 feature statistics of each exit head.
        lens_arg: [N, n_exits] int64 exit-head argmax over the feature vocabulary.
        hidden: [N, d] float32 final normed hidden state.
    """

    id: str
    category: str
    prompt: np.ndarray
    generated: np.ndarray
    eos: bool
    draft: np.ndarray
    top1: np.ndarray
    entropy: np.ndarray
    lens_arg: np.ndarray
    hidden: np.ndarray
    draft_prob: np.ndarray

    @property
    def n(self) -> int:
        return int(self.generated.shape[0])


@dataclass
class TraceSet:
    """Traces of a prompt set for one model and one set of exit heads, with their manifest."""

    traces: list[Trace]
    manifest: dict = field(default_factory=dict)

    @property
    def exit_layers(self) -> tuple[int, ...]:
        return tuple(self.manifest["exit_layers"])

    @property
    def num_layers(self) -> int:
        return int(self.manifest["model"]["num_layers"])

    def __len__(self) -> int:
        return len(self.traces)


@torch.no_grad()
def trace_one(stack: LayerStack, heads: ExitHeads, c: Continuation) -> tuple[Trace, int]:
    """Build the trace of one continuation; also return the number of positions where the
    teacher-forced full-model argmax differs from the greedy token (near-ties; 0 in fp32 in
    practice)."""
    ids = torch.tensor(c.prompt_ids + c.generated)
    P, N = len(c.prompt_ids), len(c.generated)
    eh, final, verifier = teacher_forced(stack, ids, heads.exit_layers)
    sl = slice(P - 1, P - 1 + N)
    eh, final = eh[sl], final[sl]
    mismatches = int((verifier[sl].cpu() != ids[P:P + N]).sum())
    drafts = [heads.draft_with_confidence(eh[:, i], i) for i in range(len(heads.exit_layers))]
    draft = torch.stack([d for d, _ in drafts], 1)
    draft_prob = torch.stack([p for _, p in drafts], 1)
    top1, ent, arg = heads.feature_stats(eh)
    tr = Trace(c.id, c.category, np.asarray(c.prompt_ids, np.int64), np.asarray(c.generated, np.int64), c.eos,
               draft.cpu().numpy(), top1.cpu().numpy().astype(np.float32), ent.cpu().numpy().astype(np.float32),
               arg.cpu().numpy(), final.float().cpu().numpy(), draft_prob.cpu().numpy().astype(np.float32))
    return tr, mismatches


def build_traces(bundle: ModelBundle, heads: ExitHeads, continuations: Sequence[Continuation],
                 progress: bool = True) -> TraceSet:
    """Traces of ``continuations`` under ``heads`` (not cached; see :func:`get_traces`)."""
    traces, mism = [], 0
    for c in tqdm(continuations, desc="teacher-forced traces", disable=not progress):
        t, m = trace_one(bundle.stack, heads, c)
        traces.append(t)
        mism += m
    if mism:
        warnings.warn(f"{mism} continuation positions differ from the teacher-forced argmax (near-ties): "
                      "trace replay may differ from live decoding there.")
    manifest = {
        "format": TRACE_FORMAT,
        "lede_version": __version__,
        "torch_version": torch.__version__,
        "model": {"name": bundle.name} | describe_model(bundle.model),
        "exit_layers": list(heads.exit_layers),
        "heads": {"kind": heads.kind, "draft_vocab": heads.draft_vocab, "feature_vocab": heads.feature_vocab,
                  "fingerprint": heads.fingerprint()},
        "prompt_ids": [t.id for t in traces],
        "max_new_tokens": max((len(c.generated) for c in continuations), default=0),
        "teacher_forcing_mismatches": mism,
        "eos_ids": list(bundle.eos_ids),
    }
    return TraceSet(traces, manifest)


_ARRAYS = ("prompt", "generated", "draft", "top1", "entropy", "lens_arg", "hidden", "draft_prob")


def save_traces(ts: TraceSet, folder: Path) -> None:
    """Write ``traces.safetensors`` + ``manifest.json`` into ``folder`` atomically (a temporary
    folder renamed into place)."""
    with atomic_folder(Path(folder)) as tmp:
        tensors = {}
        for a in _ARRAYS:
            tensors[a] = torch.from_numpy(np.concatenate([getattr(t, a) for t in ts.traces]))
        tensors["prompt_len"] = torch.tensor([len(t.prompt) for t in ts.traces])
        tensors["gen_len"] = torch.tensor([t.n for t in ts.traces])
        tensors["eos"] = torch.tensor([t.eos for t in ts.traces])
        save_file(tensors, str(tmp / "traces.safetensors"))
        man = dict(ts.manifest) | {"categories": [t.category for t in ts.traces],
                                   "prompt_ids": [t.id for t in ts.traces]}
        (tmp / "manifest.json").write_text(json.dumps(man, indent=2))


def load_traces(folder: Path, expect: Optional[dict] = None) -> TraceSet:
    """Read traces written by :func:`save_traces`.

    Args:
        expect: manifest entries that must match (e.g. ``{"model": {...}, "exit_layers": [...]}``).

    Raises:
        FileNotFoundError: no manifest or tensors in ``folder``.
        ValueError: a truncated or corrupt file, an incompatible format, or a manifest that does
            not match ``expect`` (traces from another model or exit set); rebuild them with
            ``lede traces build``.
    """
    folder = Path(folder)
    mpath, tpath = folder / "manifest.json", folder / "traces.safetensors"
    if not mpath.exists() or not tpath.exists():
        raise FileNotFoundError(f"No traces in {folder} (need manifest.json and traces.safetensors).")
    try:
        man = json.loads(mpath.read_text())
        t = load_file(str(tpath))
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"Traces in {folder} are truncated or corrupt ({e}); delete the folder and rebuild.") from e
    if man.get("format") != TRACE_FORMAT:
        raise ValueError(f"Traces in {folder} have format {man.get('format')}, this lede reads {TRACE_FORMAT}: rebuild.")
    for k, v in (expect or {}).items():
        if man.get(k) != v:
            raise ValueError(f"Traces in {folder} do not match: manifest {k}={man.get(k)!r}, expected {v!r} "
                             "(traces from another model, exit set or heads); rebuild them.")
    P, N = t["prompt_len"].tolist(), t["gen_len"].tolist()
    cats = man.get("categories", ["default"] * len(P))
    ids = man["prompt_ids"]
    out, po, go = [], 0, 0
    for i, (p, n) in enumerate(zip(P, N)):
        arr = {a: t[a][go:go + n].numpy() for a in _ARRAYS if a != "prompt"}
        out.append(Trace(ids[i], cats[i], t["prompt"][po:po + p].numpy(), arr["generated"], bool(t["eos"][i]),
                         arr["draft"], arr["top1"], arr["entropy"], arr["lens_arg"], arr["hidden"], arr["draft_prob"]))
        po += p
        go += n
    return TraceSet(out, man)


@dataclass
class TraceSpec:
    """Everything that names a trace set (JSON-serialisable; the env's kwargs map onto it).

    Attributes:
        model: model id/path, or ``None`` for the embedded default.
        prompts: prompt spec (see :mod:`lede_env.prompts`).
        max_new_tokens: continuation length.
        heads: the exit heads.
        device, dtype: where and in which weight dtype the model runs (``None``: see
            :func:`get_bundle`); the dtype is part of the cache key, the device is not.
    """

    model: Optional[str] = None
    prompts: str = DEFAULT_TRAIN
    max_new_tokens: int = DEFAULT_MAX_NEW
    heads: HeadSpec = field(default_factory=HeadSpec)
    device: Optional[str] = None
    dtype: Optional[str] = None

    def __post_init__(self) -> None:
        if isinstance(self.heads, dict):
            self.heads = HeadSpec(**self.heads)
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}.")


def get_traces(spec: TraceSpec, progress: bool = True, bundle: Optional[ModelBundle] = None,
               heads: Optional[ExitHeads] = None) -> TraceSet:
    """Traces for ``spec``: built on first use (with progress bars), loaded from cache after."""
    bundle = bundle or get_bundle(spec.model, spec.device, spec.dtype)
    heads = heads or get_heads(bundle, spec.heads, progress=progress)
    prompts = load_prompts(spec.prompts)
    folder = (cache_dir() / "traces" / bundle.slug /
              f"{prompts_fingerprint(prompts)}-{spec.max_new_tokens}-{heads.fingerprint()}")
    if (folder / "manifest.json").exists():
        try:
            return load_traces(folder, {"exit_layers": list(heads.exit_layers)})
        except ValueError as e:
            warnings.warn(f"{e} Rebuilding.")
    conts = get_continuations(bundle, prompts, spec.max_new_tokens, progress=progress)
    ts = build_traces(bundle, heads, conts, progress=progress)
    ts.manifest["prompts"] = spec.prompts
    save_traces(ts, folder)
    return ts


def build_continuation_shard(spec: TraceSpec, shard: tuple[int, int], progress: bool = True,
                             bundle: Optional[ModelBundle] = None) -> dict[str, int]:
    """Build shard ``k/n`` of the greedy continuations :func:`get_traces` needs for ``spec``: the
    prompts ``i`` with ``i % n == k - 1`` of the trace prompts and of the calibration prompts
    (when the exit heads need calibration). Each continuation is cached per prompt, so once all
    ``n`` shards have run (as n processes or machines sharing the lede cache folder), a plain
    unsharded :func:`get_traces` reuses every one of them and only fits the exit heads and runs
    the (cheap) teacher-forced pass.

    Args:
        shard: ``(k, n)``, 1 <= k <= n (see :func:`lede_env.sharding.parse_shard`).

    Returns:
        ``{"trace_prompts": built, "calib_prompts": built, "total": all prompts of both sets}``.
    """
    from .sharding import parse_shard, shard_indices

    shard = parse_shard(shard)
    bundle = bundle or get_bundle(spec.model, spec.device, spec.dtype)
    jobs = [("trace_prompts", load_prompts(spec.prompts), spec.max_new_tokens)]
    V = bundle.stack.head_weight.shape[0]
    h = spec.heads
    if h.kind != "lens" or (h.draft_vocab is not None and h.draft_vocab < V) or h.feature_vocab < V:
        jobs.append(("calib_prompts", load_prompts(h.calib_prompts), h.calib_max_new_tokens))
    out = {"trace_prompts": 0, "calib_prompts": 0, "total": 0}
    for name, prompts, max_new in jobs:
        mine = [prompts[i] for i in shard_indices(len(prompts), shard)]
        get_continuations(bundle, mine, max_new, progress=progress)
        out[name] = len(mine)
        out["total"] += len(prompts)
    return out
