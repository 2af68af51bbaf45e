"""Traces: greedy continuations plus one teacher-forced pass, replaying SSD exactly.

Layers 1..E are causal and do not depend on later layers, so the token an exit-E draft
produces at position i, given an accepted prefix, equals the teacher-forced exit-E draft at
i. A trace therefore tells the accepted run length of any (E, K) at any position exactly,
and the trace environment replays greedy self-speculative decoding at microseconds a round
(the module docstring of :mod:`lede_env.replay` and ``docs/mdp.md``).

A trace is built from a greedy continuation (:mod:`lede_env.continuations`) under a set of exit
heads (:mod:`lede_env.calibration`). Trace sets are cached under
:func:`~lede_env.storage.cache_dir` as
``traces/<model>/<prompts>-<max_new>-<heads>/{traces.safetensors,manifest.json}``, written under
a temporary name and renamed when whole.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .version import __version__
from .calibration import HeadSpec, get_heads
from .continuations import Continuation, get_continuations
from .exits import ExitHeads, teacher_forced
from .layers import LayerStack
from .model import ModelBundle, describe_model, get_bundle
from .prompts import DEFAULT_MAX_NEW, DEFAULT_TRAIN, load_prompts, prompts_fingerprint
from .storage import atomic_file, atomic_folder, cache_dir, packaged_file
from .sharding import parse_shard, shard_indices

TRACE_FORMAT = 2


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
            confidence compared with a stop threshold, see :class:`~lede_env.rules.RoundRules`).
        top1, entropy: [N, n_exits] float32 feature statistics of each exit head.
        lens_arg: [N, n_exits] int64 exit-head argmax over the feature vocabulary.
        hidden: [N, d] float32 final normed hidden state.
        draft_first, draft_first_prob: [N, n_exits] int64 / float32, what each exit drafts at
            local position j as a round's *first* draft token, and its probability, where that
            differs from ``draft`` (``"affine-kl-prev"`` heads, which also read the final hidden
            state at j-1: :meth:`~lede_env.exits.ExitHeads.first_logits`); ``None``: the same
            as ``draft`` and ``draft_prob``.
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
    draft_first: Optional[np.ndarray] = None
    draft_first_prob: Optional[np.ndarray] = None

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
def trace_one(stack: LayerStack, heads: ExitHeads, c: Continuation, exact_prefix: bool = False) -> tuple[Trace, int]:
    """Build the trace of one continuation; also return the number of positions where the
    teacher-forced full-model argmax differs from the greedy token (near-ties; 0 in fp32 in
    practice).

    Args:
        exact_prefix: keep only the continuation's prefix up to its first such position (then
            the count is that of the cut tail): text decoded another way (in padded batches,
            :func:`~lede_env.continuations.batched_text`) becomes a trace of the decoder's own
            greedy tokens, since every kept token is the full model's argmax after the kept
            tokens before it. A cut continuation no longer ends with EOS.
    """
    ids = torch.tensor(c.prompt_ids + c.generated)
    P, N = len(c.prompt_ids), len(c.generated)
    eh, final_all, verifier = teacher_forced(stack, ids, heads.exit_layers)
    differ = (verifier[P - 1:P - 1 + N].cpu() != ids[P:P + N]).nonzero().flatten()
    mismatches = int(differ.numel())
    generated, eos = c.generated, c.eos
    if exact_prefix and mismatches:
        N = int(differ[0])
        generated, eos = c.generated[:N], False
    sl = slice(P - 1, P - 1 + N)
    eh, final = eh[sl], final_all[sl]
    drafts = [heads.draft_with_confidence(eh[:, i], i) for i in range(len(heads.exit_layers))]
    draft = torch.stack([d for d, _ in drafts], 1)
    draft_prob = torch.stack([p for _, p in drafts], 1)
    top1, ent, arg = heads.feature_stats(eh)
    first = first_prob = None
    if heads.prev:  # the final hidden state one position before each (local j = 0 has none when P == 1)
        prev = torch.cat([final_all[P - 2:P - 1] if P >= 2 else torch.zeros_like(final[:1]), final[:-1]])[:N]
        firsts = [heads.first_with_confidence(eh[:, i], prev, i) for i in range(len(heads.exit_layers))]
        first = torch.stack([d for d, _ in firsts], 1).cpu().numpy()
        first_prob = torch.stack([p for _, p in firsts], 1).cpu().numpy().astype(np.float32)
    tr = Trace(c.id, c.category, np.asarray(c.prompt_ids, np.int64), np.asarray(generated, np.int64), eos,
               draft.cpu().numpy(), top1.cpu().numpy().astype(np.float32), ent.cpu().numpy().astype(np.float32),
               arg.cpu().numpy(), final.float().cpu().numpy(), draft_prob.cpu().numpy().astype(np.float32),
               first, first_prob)
    return tr, mismatches


def build_traces(bundle: ModelBundle, heads: ExitHeads, continuations: Sequence[Continuation],
                 progress: bool = True, exact_prefix: bool = False) -> TraceSet:
    """Traces of ``continuations`` under ``heads`` (not cached; see :func:`get_traces`).

    Args:
        exact_prefix: cut each continuation at its first position where the teacher-forced
            argmax differs (see :func:`trace_one`); for text not decoded one prompt at a time.
    """
    traces, mism = [], 0
    for c in tqdm(continuations, desc="teacher-forced traces", disable=not progress):
        t, m = trace_one(bundle.stack, heads, c, exact_prefix)
        traces.append(t)
        mism += m
    if mism and not exact_prefix:
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
        "exact_prefix": bool(exact_prefix),
        "eos_ids": list(bundle.eos_ids),
    }
    return TraceSet(traces, manifest)


_ARRAYS = ("prompt", "generated", "draft", "top1", "entropy", "lens_arg", "hidden", "draft_prob")
#: saved only by traces of ``"affine-kl-prev"`` heads
_FIRST = ("draft_first", "draft_first_prob")


#: trace sets shipped with the package (the registered tasks' training and held-out prompts on the
#: embedded model): one ``.safetensors`` file each, the manifest in its metadata, named with its
#: SHA-256 in ``MANIFEST.json`` (:func:`shipped_traces`; written by ``scripts/ship_traces.py``)
PACKAGED_TRACES = Path(__file__).parent / "data" / "traces"
#: integer arrays a shipped file stores as int32 (token ids and lengths; read back as int64)
_NARROW = ("prompt", "generated", "draft", "lens_arg", "draft_first", "prompt_len", "gen_len")


def _tensors(ts: TraceSet, hidden: bool = True) -> dict:
    """The trace set's arrays, concatenated over traces (``hidden`` left out when false)."""
    tensors = {}
    for a in _ARRAYS:
        if a != "hidden" or hidden:
            tensors[a] = torch.from_numpy(np.concatenate([getattr(t, a) for t in ts.traces]))
    tensors["prompt_len"] = torch.tensor([len(t.prompt) for t in ts.traces])
    tensors["gen_len"] = torch.tensor([t.n for t in ts.traces])
    tensors["eos"] = torch.tensor([t.eos for t in ts.traces])
    if ts.traces and all(t.draft_first is not None for t in ts.traces):
        for a in _FIRST:
            tensors[a] = torch.from_numpy(np.concatenate([getattr(t, a) for t in ts.traces]))
    return tensors


def _manifest(ts: TraceSet) -> dict:
    return dict(ts.manifest) | {"categories": [t.category for t in ts.traces], "prompt_ids": [t.id for t in ts.traces]}


def save_traces(ts: TraceSet, folder: Path) -> None:
    """Write ``traces.safetensors`` + ``manifest.json`` into ``folder`` atomically (a temporary
    folder renamed into place)."""
    with atomic_folder(Path(folder)) as tmp:
        save_file(_tensors(ts), str(tmp / "traces.safetensors"))
        (tmp / "manifest.json").write_text(json.dumps(_manifest(ts), indent=2))


def write_trace_file(ts: TraceSet, path: Path) -> None:
    """Write ``ts`` as one ``.safetensors`` file (the manifest in its metadata), without the
    hidden states (which only the ``"full"`` observation reads) and with token ids as int32:
    the form the package ships. Written under a
    temporary name and renamed when whole."""
    tensors = {k: (v.to(torch.int32) if k in _NARROW else v) for k, v in _tensors(ts, hidden=False).items()}
    with atomic_file(Path(path)) as tmp:
        save_file(tensors, str(tmp), metadata={"manifest": json.dumps(_manifest(ts) | {"hidden": False})})


def read_trace_file(path: Path) -> TraceSet:
    """Read a file written by :func:`write_trace_file`; traces without hidden states hold a
    ``[N, 0]`` ``hidden`` array.

    Raises:
        ValueError: a truncated or corrupt file, or one of another trace format.
    """
    try:
        with safe_open(str(path), "pt") as f:
            man = json.loads(f.metadata()["manifest"])
            t = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"Trace file {path} is truncated or corrupt ({e}).") from e
    if man.get("format") != TRACE_FORMAT:
        raise ValueError(f"Trace file {path} has format {man.get('format')}, this lede reads {TRACE_FORMAT}.")
    t = {k: (v.to(torch.int64) if k in _NARROW else v) for k, v in t.items()}
    if "hidden" not in t:
        t["hidden"] = torch.zeros(int(t["gen_len"].sum()), 0)
    return _trace_set(t, man)


def shipped_traces(key: str, model: dict, need_hidden: bool = False) -> Optional[TraceSet]:
    """The trace set the package ships for cache key ``key`` (``<model slug>/<prompts>-<max_new>-
    <heads>``, as under the cache), if there is one whose checksum holds, for a model described as
    ``model`` (:func:`~lede_env.model.describe_model` plus ``name``), and with hidden states where
    ``need_hidden``; else ``None``. Shipped traces make the registered tasks the same MDP on every
    machine: no teacher-forced pass runs, so no kernel or near-tie can change a draft token."""
    path = packaged_file(PACKAGED_TRACES, key, "traces")
    if path is None:
        return None
    ts = read_trace_file(path)
    if ts.manifest.get("model") != model or (need_hidden and not ts.manifest.get("hidden", True)):
        return None
    return ts


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
    return _trace_set(t, man)


def _trace_set(t: dict, man: dict) -> TraceSet:
    """The traces of concatenated arrays ``t`` (:func:`_tensors`) and their manifest."""
    P, N = t["prompt_len"].tolist(), t["gen_len"].tolist()
    cats = man.get("categories", ["default"] * len(P))
    ids = man["prompt_ids"]
    out, po, go = [], 0, 0
    for i, (p, n) in enumerate(zip(P, N)):
        arr = {a: t[a][go:go + n].numpy() for a in _ARRAYS + _FIRST if a != "prompt" and a in t}
        out.append(Trace(ids[i], cats[i], t["prompt"][po:po + p].numpy(), arr["generated"], bool(t["eos"][i]),
                         arr["draft"], arr["top1"], arr["entropy"], arr["lens_arg"], arr["hidden"], arr["draft_prob"],
                         arr.get("draft_first"), arr.get("draft_first_prob")))
        po += p
        go += n
    return TraceSet(out, man)


def trace_key(bundle: ModelBundle, prompts: Sequence, max_new_tokens: int, heads: ExitHeads) -> str:
    """The cache key of a trace set: ``<model slug>/<prompts fingerprint>-<max_new>-<heads fingerprint>``."""
    return f"{bundle.slug}/{prompts_fingerprint(prompts)}-{max_new_tokens}-{heads.fingerprint()}"


@dataclass
class TraceSpec:
    """Everything that names a trace set (JSON-serialisable; the env's kwargs map onto it).

    Attributes:
        model: model id/path, or ``None`` for the embedded default.
        prompts: prompt spec (see :mod:`lede_env.prompts`).
        max_new_tokens: continuation length.
        heads: the exit heads.
        device, dtype: where and in which weight dtype the model runs (``None``: see
            :func:`~lede_env.model.get_bundle`); the dtype is part of the cache key, the device is not.
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
               heads: Optional[ExitHeads] = None, need_hidden: bool = True) -> TraceSet:
    """Traces for ``spec``: the package's own where it ships them (:func:`shipped_traces`; with
    ``need_hidden`` only those that hold hidden states), else built on first use (with progress
    bars) and loaded from the cache after."""
    bundle = bundle or get_bundle(spec.model, spec.device, spec.dtype)
    heads = heads or get_heads(bundle, spec.heads, progress=progress)
    prompts = load_prompts(spec.prompts)
    key = trace_key(bundle, prompts, spec.max_new_tokens, heads)
    shipped = shipped_traces(key, {"name": bundle.name} | describe_model(bundle.model), need_hidden)
    if shipped is not None:
        shipped.manifest["prompts"] = spec.prompts
        return shipped
    folder = cache_dir() / "traces" / key
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
