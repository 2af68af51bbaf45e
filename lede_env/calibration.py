"""Exit-head calibration: the heads a :class:`HeadSpec` names, fitted once on the model's greedy
continuations of the calibration prompts and cached (or shipped with the package).

The fitting itself (ridge translators, KL fine-tune, vocabulary ranking, acceptance
calibration) is :mod:`lede_env.exits`; this module chooses the data, holds out part of it for
the acceptance estimate, and caches the result as
``exits/<model>/<kind>-<hash>.safetensors`` under :func:`~lede_env.storage.cache_dir` (the hash
covers the head spec and the calibration prompts' content).
"""

from __future__ import annotations

import hashlib
import math
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional, Sequence

import torch
from safetensors.torch import load_file, save_file

from .continuations import Continuation, get_continuations, stored_text
from .exits import (ExitHeads, agreement, calibrate_acceptance, default_exit_layers, finetune_kl, fit_affine, fit_first,
                    rank_vocabulary)
from .model import ModelBundle
from .prompts import DEFAULT_CALIB, DEFAULT_CALIB_MAX_NEW, load_prompts, prompts_fingerprint
from .storage import atomic_file, cache_dir, packaged_file
from .datastore import cached_datastore, spec_for


@dataclass
class HeadSpec:
    """What determines a set of exit heads (the cache key).

    The one way an exit list becomes a head spec: ``exit_layers`` may be given as any sequence of
    layer numbers or a comma-separated string (``"2,4,6"``, as the CLI takes it); it is stored as
    a tuple of ints (``None`` or empty: the default exits).

    Attributes:
        exit_layers: candidate exits (``None`` = every 2nd layer below L).
        kind: ``"lens"``, ``"affine"``, ``"affine-kl"`` or ``"affine-kl-prev"`` (see
            :mod:`lede_env.exits`).
        draft_vocab: truncated draft vocabulary size (``None`` = full vocabulary).
        feature_vocab: vocabulary of the observation features.
        calib_prompts: prompt spec whose greedy continuations fit the heads and rank the vocabulary.
        calib_max_new_tokens: continuation length for calibration.
        ridge: relative ridge strength of the affine fit.
        kl_steps: Adam steps of the KL fine-tune per exit (kinds ``"affine-kl"`` and ``"affine-kl-prev"``).
    """

    exit_layers: Optional[tuple[int, ...]] = None
    kind: str = "affine-kl"
    draft_vocab: Optional[int] = 8192
    feature_vocab: int = 1024
    calib_prompts: str = DEFAULT_CALIB
    calib_max_new_tokens: int = DEFAULT_CALIB_MAX_NEW
    ridge: float = 0.01
    kl_steps: int = 600

    def __post_init__(self) -> None:
        """Normalise ``exit_layers``.

        Raises:
            ValueError: an exit that is not a positive integer, or exits not strictly increasing.
        """
        ex = self.exit_layers
        if isinstance(ex, str):
            ex = [x for x in ex.replace(" ", "").split(",") if x]
        if not ex:
            self.exit_layers = None
            return
        try:
            ex = tuple(int(x) for x in ex)
        except (TypeError, ValueError):
            raise ValueError(f"exit_layers={self.exit_layers!r}: give layer numbers, e.g. (2, 4, 6) or '2,4,6'.") from None
        if ex[0] < 1 or any(b <= a for a, b in zip(ex, ex[1:])):
            raise ValueError(f"exit_layers={ex}: exits must be positive and strictly increasing, e.g. (2, 4, 6).")
        self.exit_layers = ex


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
    return packaged_file(PACKAGED_HEADS, key, "exit-head file")


def get_heads(bundle: ModelBundle, spec: HeadSpec, progress: bool = True, use_cache: bool = True,
              calibration: Optional[Sequence[Continuation]] = None) -> ExitHeads:
    """Exit heads for ``spec``: the shipped ones when the package has them (the embedded model's
    defaults), else fitted on calibration continuations once and loaded from the cache after.

    The fit: the draft vocabulary is ranked on every calibration continuation; translators are
    fitted on all but every :data:`HOLDOUT`-th continuation, which calibrates the acceptance
    estimate (:func:`~lede_env.exits.calibrate_acceptance`) used to stop drafts inside a round.
    ``"affine-kl-prev"`` heads start from the ``"affine-kl"`` heads of the same spec (shipped,
    cached or fitted, with their vocabulary and acceptance calibration) and fit only the
    first-token translators (:func:`~lede_env.exits.fit_first`) on the same split. The
    calibration continuations are read back from the model's shipped or cached datastore when it
    holds them (:func:`~lede_env.datastore.stored_text`), else decoded (cached per prompt).

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
    base = get_heads(bundle, replace(spec, kind="affine-kl"), progress, use_cache, calibration) if heads.prev else None
    if calibration is None:
        calibration = _stored_calibration(bundle, spec) or get_continuations(
            bundle, load_prompts(spec.calib_prompts), spec.calib_max_new_tokens, progress=progress,
            use_cache=use_cache)
    seqs = [(torch.tensor(c.prompt_ids + c.generated), len(c.prompt_ids)) for c in calibration]
    held = seqs[HOLDOUT - 1::HOLDOUT] if len(seqs) >= HOLDOUT else []
    fit = [q for j, q in enumerate(seqs) if j % HOLDOUT != HOLDOUT - 1] if held else seqs
    if base is not None:
        heads.vocab_rank = base.vocab_rank
        heads._refresh_vocab()
        heads.weight, heads.bias, heads.acceptance = base.weight, base.bias, base.acceptance
        fit_first(heads, fit, ridge=spec.ridge)
    else:
        heads.vocab_rank = rank_vocabulary(V, [c.generated for c in calibration])
        heads._refresh_vocab()
        if heads.translated:
            fit_affine(heads, fit, ridge=spec.ridge)
            if spec.kind == "affine-kl":
                finetune_kl(heads, fit, steps=spec.kl_steps)
        calibrate_acceptance(heads, held or seqs)
    if use_cache:
        _save_tensors_atomic(path, heads.state())
    return heads


def _stored_calibration(bundle: ModelBundle, spec: HeadSpec) -> Optional[list[Continuation]]:
    """The calibration continuations of ``spec`` read back from the model's shipped or cached
    datastore (the store built from them: :func:`~lede_env.datastore.spec_for`), or ``None``
    when there is none or it holds other text. Never builds a store."""
    ds = spec_for(spec.calib_prompts)
    if ds.calib_max_new_tokens != spec.calib_max_new_tokens:
        return None
    store = cached_datastore(bundle, ds)
    text = None if store is None else stored_text(bundle, ds, store)
    return None if text is None else text[0]


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


def _save_tensors_atomic(path: Path, tensors: dict[str, torch.Tensor], metadata: Optional[dict] = None) -> None:
    with atomic_file(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
