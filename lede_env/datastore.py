"""Drafts from a datastore of the model's own text, where the context has no match.

A context draft (:mod:`lede_env.lookup`) needs the text to repeat itself. Much of what a model
writes repeats *its own habits* instead: the phrases it opens answers with, the idioms of the
code it writes, the connectives of its prose. Retrieval-based drafting (REST, arXiv 2311.08252)
and SuffixDecoding's global suffix tree over earlier outputs (arXiv 2411.04975) draft those
from a store of earlier text; like a context draft, such a draft costs no layers, and the full
model verifies it like any other, so the output does not change.

:class:`NgramDatastore` keeps, for every n-gram of ``ngram[0] .. ngram[1]`` tokens in its
sequences, the token that most often follows it, when it follows at least ``min_count`` times
and makes at least ``min_share`` of what follows. A draft extends the text token by token with
the longest n-gram that has such a token, and ends where none has. The default store is the
model's own greedy text: its continuations of the calibration prompts
(:data:`~lede_env.prompts.DEFAULT_CALIB`) and its batched greedy text of 879 more prompts
(:data:`~lede_env.prompts.DATASTORE_EXTRA`: what no split uses of the same sources, and prose and
chat prompts written for lede), all disjoint from the training and evaluation prompts; for the
embedded model it ships with the package (``lede_env/data/datastore/``, made by
``scripts/build_datastore.py``). The store's size is what counts: more of the model's own text
accepts more draft tokens per position without a context match.

Measured figures (accepted draft tokens per held-out position without a context match, per
category and by store size, with ``python benchmarks/datastore_drafts.py --calib-only`` and
``--fractions``; wall-clock speedups over the AR loop with ``--live N``) are in
``docs/performance.md`` ("The datastore and context drafts") and ``docs/experiments.md``.
"""

from __future__ import annotations

import hashlib
import warnings
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np

from .lookup import check_ngram
from .prompts import DATASTORE_EXTRA, DEFAULT_CALIB, DEFAULT_CALIB_MAX_NEW, load_prompts, prompts_fingerprint
from .storage import atomic_file, cache_dir, packaged_file

if TYPE_CHECKING:
    from .model import ModelBundle

#: where the embedded model's datastore ships (``MANIFEST.json`` names each file and its SHA-256)
PACKAGED_DATASTORE = Path(__file__).parent / "data" / "datastore"
#: bumped whenever what a datastore proposes for the same sequences changes (cache keys)
DATASTORE_VERSION = 1


class NgramDatastore:
    """Next-token table of a token datastore, drafting greedily from the longest n-gram.

    Args:
        sequences: token-id sequences of the store (e.g. the model's own greedy continuations,
            each preceded by the last tokens of its prompt).
        ngram: (shortest, longest) n-gram lengths looked up, ``1 <= shortest <= longest``.
        min_count: an n-gram's most frequent next token is proposed only if it followed the
            n-gram at least this many times (>= 1).
        min_share: ... and made at least this share of what followed it (in (0, 1]).
        min_path_share: a draft ends before the token at which the product of its tokens' shares
            (each token's share of what followed its n-gram: a frequency estimate that the draft
            is right so far) would fall below this (in [0, 1]; 0: only ``min_share`` ends it).

    Raises:
        ValueError: bad ``ngram``, ``min_count``, ``min_share`` or ``min_path_share``.
    """

    def __init__(self, sequences: Sequence[Sequence[int]], ngram: tuple[int, int] = (2, 4), min_count: int = 2,
                 min_share: float = 0.5, min_path_share: float = 0.0) -> None:
        self.lo, self.hi = check_ngram(ngram)
        if int(min_count) < 1 or not 0.0 < float(min_share) <= 1.0 or not 0.0 <= float(min_path_share) <= 1.0:
            raise ValueError(f"min_count={min_count} must be >= 1, min_share={min_share} in (0, 1] and "
                             f"min_path_share={min_path_share} in [0, 1].")
        self.min_count, self.min_share, self.min_path_share = int(min_count), float(min_share), float(min_path_share)
        self.sequences = [np.asarray(s, dtype=np.int64) for s in sequences]
        counts: dict[int, dict[tuple[int, ...], Counter]] = {n: {} for n in range(self.lo, self.hi + 1)}
        for s in self.sequences:
            t = s.tolist()
            for n in counts:
                table = counts[n]
                for i in range(len(t) - n):
                    table.setdefault(tuple(t[i:i + n]), Counter())[t[i + n]] += 1
        # n -> n-gram -> (the token proposed after it, its share of what followed the n-gram);
        # ties go to the lowest id, so proposals are deterministic
        self._next: dict[int, dict[tuple[int, ...], tuple[int, float]]] = {}
        for n, table in counts.items():
            keep = {}
            for key, c in table.items():
                tok, k = min(c.items(), key=lambda kv: (-kv[1], kv[0]))
                total = sum(c.values())
                if k >= self.min_count and k >= self.min_share * total:
                    keep[key] = (tok, k / total)
            self._next[n] = keep

    @property
    def tokens(self) -> int:
        """Tokens in the store."""
        return int(sum(len(s) for s in self.sequences))

    def __len__(self) -> int:
        """N-grams with a proposed next token."""
        return sum(len(t) for t in self._next.values())

    def propose(self, seq: Sequence[int], max_len: int) -> list[int]:
        """Up to ``max_len`` draft tokens after ``seq`` (prompt and generated ids, the pending
        token last): each the proposed next token of the longest n-gram at the end of the text
        extended so far; ``[]`` when the last ``ngram[0]`` tokens have none.

        Raises:
            ValueError: a negative ``max_len``.
        """
        if max_len < 0:
            raise ValueError(f"max_len={max_len} must be >= 0.")
        s = [int(t) for t in seq[-self.hi:]]
        out: list[int] = []
        path = 1.0
        while len(out) < max_len:
            for n in range(min(self.hi, len(s)), self.lo - 1, -1):
                hit = self._next[n].get(tuple(s[len(s) - n:]))
                if hit is not None:
                    break
            else:
                break
            path *= hit[1]
            if path < self.min_path_share:
                break
            out.append(hit[0])
            s.append(hit[0])
        return out

    def fingerprint(self) -> str:
        """Short hash of the store and its parameters (what changes the proposals)."""
        h = hashlib.sha256(repr((self.lo, self.hi, self.min_count, self.min_share, self.min_path_share,
                                 DATASTORE_VERSION)).encode())
        for s in self.sequences:
            h.update(np.int64(len(s)).tobytes())
            h.update(s.astype(np.int64).tobytes())
        return h.hexdigest()[:12]

    def save(self, path: Path) -> None:
        """Write the store (``.npz``: the sequences and the parameters), atomically."""
        lengths = np.array([len(s) for s in self.sequences], dtype=np.int64)
        flat = np.concatenate(self.sequences).astype(np.int32) if self.sequences else np.zeros(0, np.int32)
        with atomic_file(Path(path), suffix=".npz") as tmp, open(tmp, "wb") as f:
            np.savez(f, tokens=flat, lengths=lengths,
                     params=np.array([self.lo, self.hi, self.min_count], dtype=np.int64),
                     shares=np.array([self.min_share, self.min_path_share], dtype=np.float64))

    @classmethod
    def load(cls, path: Path) -> "NgramDatastore":
        """Read a store written by :meth:`save`. Raises ``ValueError`` on a malformed file."""
        try:
            with np.load(Path(path)) as z:
                flat, lengths, params, shares = z["tokens"], z["lengths"], z["params"], z["shares"]
        except (OSError, KeyError, ValueError) as e:
            raise ValueError(f"{path} is not a lede datastore: {e}") from e
        if lengths.sum() != len(flat):
            raise ValueError(f"{path} is not a lede datastore: its lengths do not add up to its tokens.")
        seqs = np.split(flat.astype(np.int64), np.cumsum(lengths)[:-1]) if len(lengths) else []
        return cls(seqs, (int(params[0]), int(params[1])), int(params[2]), float(shares[0]), float(shares[1]))


def with_datastore(match: tuple[int, list[int]], seq: Sequence[int], max_len: int,
                   datastore: Optional[NgramDatastore]) -> tuple[int, list[int]]:
    """The draft a context match makes, with the datastore where the context has none: ``match``
    (``(n, tokens)`` of :func:`~lede_env.lookup.context_match` for ``seq`` and ``max_len``) when
    ``n > 0`` or without a datastore, else ``(0, datastore.propose(seq, max_len))``. The one rule
    the decoder, the trace replay and the observations share."""
    if match[0] or datastore is None:
        return match
    return 0, datastore.propose(seq, max_len)


@dataclass(frozen=True)
class DatastoreSpec:
    """What determines a model's default datastore (its cache key).

    Attributes:
        calib_prompts: prompt spec whose greedy continuations fill the store (the exit heads'
            calibration continuations, :func:`~lede_env.continuations.get_continuations`).
        calib_max_new_tokens: tokens of each continuation.
        extra_prompts: more prompts whose greedy text also fills the store, decoded in batches
            (:func:`~lede_env.continuations.batched_text`); ``""``: none. The default,
            :data:`~lede_env.prompts.DATASTORE_EXTRA`, is disjoint from the calibration, training
            and evaluation splits.
        extra_max_new_tokens: most tokens of each of those.
        prompt_tail: last prompt tokens kept before each continuation (the chat template's end:
            what the model opens its answers with after it).
        ngram, min_count, min_share, min_path_share: as :class:`NgramDatastore`.
    """

    calib_prompts: str = DEFAULT_CALIB
    calib_max_new_tokens: int = DEFAULT_CALIB_MAX_NEW
    extra_prompts: str = DATASTORE_EXTRA
    extra_max_new_tokens: int = 128
    prompt_tail: int = 4
    ngram: tuple[int, int] = (2, 4)
    min_count: int = 2
    min_share: float = 0.5
    min_path_share: float = 0.0


def spec_for(calib_prompts: str) -> DatastoreSpec:
    """The datastore that goes with exit heads fitted on ``calib_prompts``: their continuations,
    and :data:`~lede_env.prompts.DATASTORE_EXTRA`'s text when they are the default calibration
    prompts. A custom calibration set names the text its user chose; its store holds that text
    alone (and costs no more decoding than the heads already need)."""
    return DatastoreSpec(calib_prompts=calib_prompts, extra_prompts=DATASTORE_EXTRA if calib_prompts == DEFAULT_CALIB else "")


def datastore_key(bundle: "ModelBundle", spec: DatastoreSpec) -> str:
    """``<model>/<hash>``: the model, the spec and its prompts' content."""
    fp = [prompts_fingerprint(load_prompts(p)) if p else "" for p in (spec.calib_prompts, spec.extra_prompts)]
    h = hashlib.sha256(repr((asdict(spec), fp, DATASTORE_VERSION)).encode()).hexdigest()[:12]
    return f"{bundle.slug}/{h}"


def build_datastore(continuations, spec: DatastoreSpec = DatastoreSpec()) -> NgramDatastore:
    """The store of ``continuations`` (:class:`~lede_env.continuations.Continuation`): each one's
    generated tokens after the last ``spec.prompt_tail`` tokens of its prompt."""
    seqs = [list(c.prompt_ids[max(len(c.prompt_ids) - spec.prompt_tail, 0):]) + list(c.generated)
            for c in continuations]
    return NgramDatastore(seqs, spec.ngram, spec.min_count, spec.min_share, spec.min_path_share)


def packaged_datastore(key: str) -> Optional[Path]:
    """The shipped store for ``key`` if the package has one whose checksum matches its manifest
    (a mismatch warns and is ignored: the store is then rebuilt)."""
    return packaged_file(PACKAGED_DATASTORE, key, "datastore")


#: stores read in this process, by (path, mtime, size): loading one indexes it (seconds)
_LOADED: dict = {}


def cached_datastore(bundle: "ModelBundle", spec: DatastoreSpec = DatastoreSpec()) -> Optional[NgramDatastore]:
    """The model's datastore for ``spec`` if the package ships it or the cache holds it (an
    unreadable file warns and is skipped), else ``None``; never builds one."""
    key = datastore_key(bundle, spec)
    for p in (packaged_datastore(key), cache_dir() / "datastore" / f"{key}.npz"):
        if p is None or not p.exists():
            continue
        st = p.stat()
        memo = (str(p), st.st_mtime_ns, st.st_size)
        if memo in _LOADED:  # (a store is read-only: every env of a process shares one)
            return _LOADED[memo]
        try:
            _LOADED[memo] = NgramDatastore.load(p)
            return _LOADED[memo]
        except ValueError as e:  # a bad cache file is rebuilt, never trusted
            warnings.warn(f"Ignoring unreadable datastore {p} ({e}); rebuilding it.")
    return None
