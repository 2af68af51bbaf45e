"""Cost profiles: what one round of self-speculative decoding costs, in AR-step units.

A round with exit layer E, speculation length K and ``n`` verified positions (``n = K + 1``
when the verifier's bonus token is wanted, else ``n = K``) pays, with compute reuse
(LayerSkip, arXiv 2404.16710 - the draft's layers 1..E are never recomputed):

- drafting: K passes of one token through layers 1..E plus the draft head, and, when
  ``n = K + 1``, one more pass of the last draft token through layers 1..E (no head);
- verification: layers E+1..L on ``n`` positions at once, plus the full LM head on them;
- overhead: observation features and the policy's forward pass (charged every round).

A plain AR step (action 0) pays all L layers and the full head on one token. Costs are
divided by the time of one AR step, so an AR step costs exactly ``1 + overhead share``.

Profiles are *measured* on the user's hardware (:func:`measure_profile`, ``lede profile``)
or *analytic* (:func:`analytic_profile`): time proportional to the parameters read (decoding
is memory-bound), with a small per-extra-token slope. :func:`lede_env.loop_profile.get_profile` gives the profile of
a kind (``"measured"`` in the real loop, ``"isolated"``, ``"analytic"``, a file), measured once
per model, heads, machine and kernels and cached (:func:`profile_path`).
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np
import torch

from .kernels import KERNELS_VERSION
from .layers import LayerStack
from .mdp import ObservationBuilder, ObservationConfig
from .storage import cache_dir, packaged_file, write_json_atomic
from .suffix_index import TokenTree

if TYPE_CHECKING:
    from .exits import ExitHeads
    from .model import ModelBundle


@dataclass
class CostProfile:
    """Per-component times (seconds, or any consistent unit) for one model on one machine.

    Attributes:
        num_layers: L.
        layer: ``layer[k-1]`` = one decoder layer on k new tokens with a KV cache, k = 1..k_max+1.
        head: ``head[k-1]`` = final norm + full LM head on k positions.
        draft_head: one draft-head call for one token (translator + truncated head).
        overhead: per-round observation features + policy forward.
        source: ``"measured"`` (isolated timings), ``"in-loop"`` (fitted to rounds timed in the
            real decoding loop, :func:`fit_profile`), ``"reference"`` (an in-loop profile shipped with
            the package, measured on the reference machine: :func:`reference_profile`) or ``"analytic"``.
        meta: free-form facts (device, threads, model, context length).
    """

    num_layers: int
    layer: list[float]
    head: list[float]
    draft_head: float
    overhead: float = 0.0
    source: str = "analytic"
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.layer) != len(self.head) or not self.layer:
            raise ValueError("CostProfile.layer and .head must be non-empty lists of equal length (k = 1..k_max+1).")

    @property
    def max_positions(self) -> int:
        """Largest number of verified positions the profile covers."""
        return len(self.layer)

    @property
    def ar_step(self) -> float:
        """Time of one plain AR step: L layers + full head on one token."""
        return self.num_layers * self.layer[0] + self.head[0]

    def _k(self, table: list[float], k: int) -> float:
        if k <= len(table):
            return table[k - 1]
        # Linear extrapolation past the measured range.
        slope = table[-1] - table[-2] if len(table) > 1 else table[-1]
        return table[-1] + slope * (k - len(table))

    def round_cost(self, exit_layer: int, draft_len: int, n_verify: int, reuse: bool = True,
                   passes: Optional[int] = None, tree: bool = False) -> float:
        """Cost of one round in AR-step units.

        Args:
            exit_layer: E (0 for a plain AR step, or a context draft: no layers drafted, all L
                layers and the head verify ``n_verify`` positions; its n-gram matching is not
                charged, tens of microseconds).
            draft_len: K, draft tokens kept for verification.
            n_verify: positions verified (K or K+1; 1 for an AR step or a dropped draft).
            reuse: verification runs only layers E+1..L (the draft's layers 1..E are reused);
                without reuse it runs all L layers on the verified positions.
            tree: the round verifies a token tree (``exit_layer`` 0, ``draft_len`` its nodes,
                ``n_verify`` = nodes + 1) under a tree attention mask; charged as a context draft
                of as many positions (the tree's verify pass, mask and cache compaction included,
                measured 1.00-1.02x a causal pass of as many positions, n = 2..16:
                :func:`measure_tree_verify`, ``docs/experiments.md`` "Tree verification cost").
            passes: draft passes (layers 1..E + draft head on one token) actually run, default K.
                One more than K when an in-round stop rule looked at a draft token and dropped it
                (:class:`~lede_env.stopping.CalibratedStop`); with ``passes > 0`` and ``K = 0``
                the round tried exit E and verified only the pending token (cost: an AR step +
                the draft head, + layers 1..E again without reuse).
        """
        passes = draft_len if passes is None else passes
        if exit_layer == 0:  # an AR step (1 position) or a context draft: all L layers on n positions
            t = self._verify_time(max(int(n_verify), 1))
        elif passes == 0:
            t = self.ar_step
        else:
            E, L = exit_layer, self.num_layers
            t = passes * (E * self.layer[0] + self.draft_head)
            if reuse:
                t += max(n_verify - passes, 0) * E * self.layer[0]
            t += (L - E if reuse else L) * self._k(self.layer, n_verify) + self._k(self.head, n_verify)
        return (t + self.overhead) / self.ar_step

    def _verify_time(self, k: int) -> float:
        """All L layers and the full LM head on k positions, in the profile's unit."""
        return self.num_layers * self._k(self.layer, k) + self._k(self.head, k)

    def verify_cost(self, k: int) -> float:
        """c(k): all L layers and the full LM head on k positions, in AR steps (c(1) = 1)."""
        return self._verify_time(k) / self.ar_step

    def c_table(self) -> dict:
        """c(k) for k = 1..:attr:`max_positions` of one layer, the LM head and the whole verify
        pass, each relative to its own one-position time: ``{"layer": [...], "head": [...],
        "verify": [...]}``."""
        ks = range(1, self.max_positions + 1)
        return {"layer": [self.layer[k - 1] / self.layer[0] for k in ks],
                "head": [self.head[k - 1] / self.head[0] for k in ks],
                "verify": [self.verify_cost(k) for k in ks]}

    def to_json(self) -> dict:
        return asdict(self)

    def save(self, path: Path) -> None:
        """Write as JSON (atomically)."""
        write_json_atomic(Path(path), self.to_json())

    @classmethod
    def load(cls, path: Path) -> "CostProfile":
        """Read a profile written by :meth:`save`. Raises ``ValueError`` on a malformed file."""
        try:
            d = json.loads(Path(path).read_text())
            return cls(**d)
        except (json.JSONDecodeError, TypeError) as e:
            raise ValueError(f"{path} is not a lede cost profile: {e}") from e


def round_terms(num_layers: int, positions: int, exit_layer: int, draft_len: int, n_verify: int,
                passes: Optional[int] = None, reuse: bool = True) -> "np.ndarray":
    """The round-time model of :meth:`CostProfile.round_cost` as a linear form in the profile's
    times: ``t = round_terms(...) @ [layer[0..m-1], head[0..m-1], draft_head]`` (seconds, overhead
    not included), ``m = positions``.

    Returns:
        float64 array [2m + 1]: how many times the round pays each layer time (one layer on k
        positions), each head time (LM head on k positions) and the draft head.

    Raises:
        ValueError: ``n_verify`` above ``positions`` (the profile has no time for it).
    """
    m, L = int(positions), int(num_layers)
    n = max(int(n_verify), 1)
    if n > m:
        raise ValueError(f"n_verify={n_verify} exceeds the profile's {m} positions.")
    passes = draft_len if passes is None else passes
    a = np.zeros(2 * m + 1)
    if exit_layer == 0 or passes == 0:  # AR step or context draft (passes == 0: an AR step)
        n = n if exit_layer == 0 else 1
        a[n - 1] += L
        a[m + n - 1] += 1
        return a
    E = exit_layer
    a[0] += passes * E + (max(n - passes, 0) * E if reuse else 0)
    a[2 * m] += passes
    a[n - 1] += L - E if reuse else L
    a[m + n - 1] += 1
    return a


def fit_profile(rounds: Sequence[tuple[int, int, int, int, float]], prior: CostProfile, reuse: bool = True,
                prior_weight: float = 0.02, outlier_mads: float = 4.0) -> CostProfile:
    """Fit a profile's times to rounds timed in the real decoding loop.

    Isolated timings (:func:`measure_profile`) miss what the loop does to them: the draft's
    layers and the previous round evict the weights the next product reads, and the decoder's
    own bookkeeping costs time: on CPUs the isolated profile rates exit-draft rounds cheaper than
    they run (``docs/experiments.md``, "The cost profile"). This fit keeps the profile's structure (what a round pays,
    :func:`round_terms`) and finds the layer, head and draft-head times that predict the rounds'
    measured times best: least squares on relative errors, with a weak pull (``prior_weight``
    per time) toward ``prior`` for combinations the rounds cannot tell apart (a layer on k
    positions against the head on k positions), refitted once without rounds further than
    ``outlier_mads`` median absolute deviations from the fit (pre-emption by the OS). The layer
    and head times are kept non-decreasing in the number of positions (a few rounds verify 5 or
    7 positions; unconstrained, their times came out below those of 4 or 6).

    Args:
        rounds: ``(exit_layer, draft_len, n_verify, passes, seconds)`` per round; ``seconds``
            without the policy's time. Rounds verifying more positions than the prior covers
            are skipped.
        prior: the isolated profile (its ``overhead`` is kept as it is).
        reuse: the rounds reused the draft's layers (:class:`~lede_env.decoding.SelfSpeculativeDecoder`'s ``reuse``).

    Returns:
        A :class:`CostProfile` with ``source="in-loop"``; ``meta`` adds ``rounds`` (used),
        ``outliers``, ``median_rel_error`` (of the fit on its rounds) and ``prior_median_rel_error``
        (the isolated profile on the same rounds).

    Raises:
        ValueError: fewer rounds than the profile has times.
    """
    m, L = prior.max_positions, prior.num_layers
    rows, ys = [], []
    for e, k, n, p, sec in rounds:
        if max(int(n), 1) <= m and sec > 0:
            rows.append(round_terms(L, m, e, k, n, p, reuse))
            ys.append(float(sec))
    A, y = np.array(rows).reshape(-1, 2 * m + 1), np.array(ys)
    if len(y) < 2 * m + 1:
        raise ValueError(f"fit_profile needs at least {2 * m + 1} timed rounds, got {len(y)}; time more rounds.")
    theta0 = np.array(list(prior.layer) + list(prior.head) + [prior.draft_head], dtype=np.float64)
    P, w = np.diag(np.sqrt(prior_weight) / theta0), np.full(len(theta0), np.sqrt(prior_weight))
    # times as cumulative increments per table (layer[k] = layer[0] + increments up to k, the same
    # for head): more positions never cost less, so increments are kept >= 0 (active set)
    T = np.zeros((2 * m + 1, 2 * m + 1))
    for b in (0, m):
        T[b:b + m, b:b + m] = np.tril(np.ones((m, m)))
    T[2 * m, 2 * m] = 1.0
    increments = [j for j in range(2 * m) if j not in (0, m)]

    def solve(keep):
        M = np.vstack([A[keep] / y[keep, None], P]) @ T
        rhs = np.concatenate([np.ones(keep.sum()), w])
        free = np.ones(2 * m + 1, bool)
        while True:
            delta = np.zeros(2 * m + 1)
            delta[free] = np.linalg.lstsq(M[:, free], rhs, rcond=None)[0]
            neg = [j for j in increments if free[j] and delta[j] < 0]
            if not neg:
                return np.maximum(T @ delta, 0.05 * theta0)  # times stay positive
            free[min(neg, key=lambda j: delta[j])] = False

    keep = np.ones(len(y), bool)
    rel = A @ solve(keep) / y - 1.0
    dev = np.abs(rel - np.median(rel))
    keep = dev <= outlier_mads * 1.4826 * np.median(dev) + 1e-12
    theta = solve(keep)
    rel = A @ theta / y - 1.0
    rel_prior = A @ theta0 / y - 1.0
    return CostProfile(num_layers=L, layer=theta[:m].tolist(), head=theta[m:2 * m].tolist(), draft_head=float(theta[-1]),
                       overhead=prior.overhead, source="in-loop",
                       meta=dict(prior.meta, rounds=int(keep.sum()), outliers=int((~keep).sum()),
                                 median_rel_error=float(np.median(np.abs(rel[keep]))),
                                 prior_median_rel_error=float(np.median(np.abs(rel_prior)))))


def analytic_profile(stack: LayerStack, k_max: int, draft_vocab: Optional[int] = None,
                     affine: bool = True, slope: float = 0.07, overhead: float = 0.01) -> CostProfile:
    """A profile from parameter counts (memory-bound decoding).

    One token through a module costs its parameter count; each extra token in the same pass
    adds ``slope`` of that (the default comes from a CPU measurement of the embedded model, ``docs/experiments.md``).
    ``overhead`` is a share of one AR step.
    """
    layer_params = sum(p.numel() for p in stack.layers[0].parameters())
    V, d = stack.head_weight.shape
    head_params = V * d
    dv = V if draft_vocab is None else draft_vocab
    draft = dv * d + (d * d if affine else 0)
    ks = range(1, k_max + 2)
    prof = CostProfile(
        num_layers=stack.num_layers,
        layer=[layer_params * (1 + slope * (k - 1)) for k in ks],
        head=[head_params * (1 + slope * (k - 1)) for k in ks],
        draft_head=float(draft),
        source="analytic",
        meta={"unit": "parameters read", "slope": slope},
    )
    prof.overhead = overhead * prof.ar_step
    return prof


def min_time(fn, repeats: int, device: Optional[torch.device] = None) -> float:
    """Fastest of ``repeats`` timings of ``fn()`` in seconds (the least disturbed by other work).

    On a CUDA ``device`` each call is timed with CUDA events recorded on the current stream
    around it, after a synchronisation, so the time is the kernels' own, not the (asynchronous)
    launch time; elsewhere with ``time.perf_counter``.
    """
    best = float("inf")
    cuda = device is not None and torch.device(device).type == "cuda"
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            fn()
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) / 1000.0)
        else:
            t = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t)
    return best


@torch.no_grad()
def measure_profile(stack: LayerStack, heads, k_max: int, context: int = 256, repeats: int = 9,
                    overhead_fn=None) -> CostProfile:
    """Measure a cost profile on this machine (seconds), on the stack's device (CUDA events on a GPU).

    Times, with a KV cache holding ``context`` positions: all L layers on k tokens
    (k = 1..k_max+1, per layer = total / L), the full head on k positions, one draft-head call,
    and ``overhead_fn()`` (features + policy) when given.

    Args:
        stack: the model.
        heads: the :class:`~lede_env.exits.ExitHeads` the decoder will draft with.
        k_max: largest speculation length.
        context: cached positions during timing (attention cost grows with it).
        repeats: rounds of timing; in each, every k is timed once (interleaved, so drift hits
            all k alike) and the fastest time per item is kept.
        overhead_fn: zero-argument callable timed as the per-round overhead.
    """
    with stack.kernels_active():
        return _measure(stack, heads, k_max, context, repeats, overhead_fn)


def _measure(stack, heads, k_max, context, repeats, overhead_fn) -> CostProfile:
    dev = stack.device
    g = torch.Generator().manual_seed(0)
    V = stack.head_weight.shape[0]
    cache = stack.new_cache()
    ids = torch.randint(0, V, (1, context), generator=g).to(stack.device)
    stack.run(stack.embed(ids), 0, stack.num_layers, cache, 0)
    d = stack.hidden_size
    ks = range(1, k_max + 2)
    xs = {k: torch.randn(1, k, d, generator=g).to(stack.device, stack.dtype) for k in ks}
    ropes = {k: stack.positions(xs[k], context) for k in ks}

    def run_layers(k):
        stack.run(xs[k], 0, stack.num_layers, cache, context, ropes[k])
        stack.crop(cache, context)

    def run_head(k):
        stack.greedy_tokens(stack.norm(xs[k][0]))

    layer = [float("inf")] * len(ks)
    head = [float("inf")] * len(ks)
    for k in ks:  # warm-up
        run_layers(k)
        run_head(k)
    for _ in range(repeats):
        for k in ks:
            layer[k - 1] = min(layer[k - 1], min_time(lambda: run_layers(k), 1, dev) / stack.num_layers)
            head[k - 1] = min(head[k - 1], min_time(lambda: run_head(k), 1, dev))
    x1 = torch.randn(1, 1, d, generator=g).to(stack.device, stack.dtype)
    heads.draft_tokens(x1, 0)
    draft = min_time(lambda: heads.draft_tokens(x1, 0), repeats * 3, dev)
    over = 0.0
    if overhead_fn is not None:
        overhead_fn()
        over = min_time(overhead_fn, repeats * 3, dev)
    return CostProfile(num_layers=stack.num_layers, layer=layer, head=head, draft_head=draft, overhead=over,
                       source="measured", meta={"unit": "seconds", "context": context,
                                                "threads": torch.get_num_threads(), "device": str(stack.device),
                                                "device_name": _device_name(stack.device),
                                                "dtype": str(stack.dtype).replace("torch.", ""),
                                                "kernels": stack.kernels_tag})


def heap_tree(n: int) -> TokenTree:
    """A token tree of ``n`` nodes shaped as a binary heap (the root's children are nodes 0 and 1,
    node i's are 2i + 2 and 2i + 3): what :func:`measure_tree_verify` verifies (the cost of a pass
    depends on the node count, not on the shape: the mask is dense either way). Tokens 3..n+2."""
    parents = [-1 if i < 2 else (i - 2) // 2 for i in range(n)]
    depth: list[int] = []
    for p in parents:
        depth.append(1 if p < 0 else depth[p] + 1)
    t = torch.arange(3, n + 3, dtype=torch.int64)
    return TokenTree(t, torch.tensor(parents, dtype=torch.int64), torch.tensor(depth, dtype=torch.int64),
                     torch.ones(n, dtype=torch.int64), torch.ones(n, dtype=torch.float64))


@torch.no_grad()
def measure_tree_verify(stack: LayerStack, nodes: Sequence[int] = (2, 4, 8, 16), context: int = 256,
                        repeats: int = 15) -> dict[int, dict[str, float]]:
    """Time the verify pass of a token tree against a copy draft's of as many positions (seconds).

    With ``context`` cached positions, per n in ``nodes``, interleaved over ``repeats`` rounds:
    ``"copy"``: a causal pass of all L layers and the full LM head over n + 1 positions, then the
    cache cropped back; ``"tree"``: what a tree round's verification does in the decoding loop
    (:meth:`lede_env.decoding.SelfSpeculativeDecoder._verify_tree`): the tree attention mask and
    depth positions built (:func:`heap_tree`, :meth:`LayerStack.tree_inputs`), the same pass over
    the root and the n nodes under it, the head, and the cache compacted to the root and its
    deepest branch (:meth:`LayerStack.compact`) then cropped back.

    Returns:
        ``{n: {"copy": s, "tree": s, "copy_median": s, "tree_median": s}}``: the fastest and the
        median time of each (seconds).
    """
    with stack.kernels_active():
        g = torch.Generator().manual_seed(0)
        V = stack.head_weight.shape[0]
        cache = stack.new_cache()
        stack.run(stack.embed(torch.randint(0, V, (1, context), generator=g).to(stack.device)), 0, stack.num_layers,
                  cache, 0)
        trees = {n: heap_tree(n) for n in nodes}

        def copy(n):
            x = stack.embed(torch.randint(3, V, (1, n + 1), generator=g).to(stack.device))
            stack.greedy_tokens(stack.norm(stack.run(x, 0, stack.num_layers, cache, context)[0])).tolist()
            stack.crop(cache, context)

        def tree(n):
            t = trees[n]
            x = stack.embed(torch.cat([torch.tensor([5]), t.tokens]).view(1, -1).to(stack.device))
            local = torch.ones(n + 1, n + 1, dtype=torch.bool).tril_(0)
            local[1:, 1:] = t.attention_mask()
            rope, masks = stack.tree_inputs(x, context, local, torch.cat([torch.tensor([context]), t.positions(context)]))
            stack.greedy_tokens(stack.norm(stack.run(x, 0, stack.num_layers, cache, context, rope, masks)[0])).tolist()
            branch, node = [], n - 1
            while node >= 0:
                branch.append(1 + node)
                node = int(t.parents[node])
            stack.compact(cache, context, [0] + branch[::-1])
            stack.crop(cache, context)

        times = {n: {"copy": [], "tree": []} for n in nodes}
        for n in nodes:  # warm-up
            copy(n)
            tree(n)
        for _ in range(repeats):
            for n in nodes:
                for kind, fn in (("copy", copy), ("tree", tree)):
                    times[n][kind].append(min_time(lambda: fn(n), 1, stack.device))
    return {n: {"copy": min(t["copy"]), "tree": min(t["tree"]), "copy_median": float(np.median(t["copy"])),
                "tree_median": float(np.median(t["tree"]))} for n, t in times.items()}


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"


# ---- profiles by kind, measured once per machine and cached --------------------------------
#: Version of the in-loop profile measurement (:mod:`lede_env.loop_profile`), in its cache key.
LOOP_PROFILE_VERSION = 5


def profile_path(bundle: ModelBundle, heads: ExitHeads, k_max: int, obs: ObservationConfig,
                 kind: str = "measured") -> Path:
    """Where the measured cost profile of this model, heads, K_max, observation, machine, thread
    count and kernel table is cached (``~/.cache/lede/profiles/<model>/<key>.json``; the in-loop
    profile, ``kind="measured"``, at ``<key>-loop<version>.json`` beside the isolated one). The
    context matches' agreement and span features are left out of the key: they cost a few
    microseconds a round (a common prefix of at most 8 tokens, a common suffix of at most 32), far
    below what the profile can resolve."""
    layout = {k: v for k, v in asdict(obs).items() if k not in ("context_agreement", "context_span")}
    tag = hashlib.sha256(repr((heads.fingerprint(), k_max, layout, platform.node(), torch.get_num_threads(),
                               bundle.stack.kernels_tag, KERNELS_VERSION,
                               str(bundle.stack.device))).encode()).hexdigest()[:12]
    suffix = f"-loop{LOOP_PROFILE_VERSION}" if kind == "measured" else ""
    return cache_dir() / "profiles" / bundle.slug / f"{tag}{suffix}.json"


#: cost profiles shipped with the package, measured in the decoding loop on a named reference
#: machine (``cost_profile="reference"``, the registered tasks' costs; :func:`reference_profile`)
PACKAGED_PROFILES = Path(__file__).parent / "data" / "profiles"


def reference_key(bundle: ModelBundle, heads: ExitHeads, k_max: int, obs: ObservationConfig) -> str:
    """The key of a shipped reference profile: the model, its exit heads, the positions timed and
    the observation layout (what the per-round overhead depends on), never the machine."""
    layout = {k: v for k, v in asdict(obs).items() if k not in ("context_agreement", "context_span")}
    tag = hashlib.sha256(repr((heads.fingerprint(), int(k_max), layout)).encode()).hexdigest()[:12]
    return f"{bundle.slug}/{tag}"


def reference_profile(bundle: ModelBundle, heads: ExitHeads, k_max: int, obs: ObservationConfig) -> CostProfile:
    """The cost profile the package ships for this model, heads, positions and observation:
    measured on the reference machine (its ``meta`` names the machine, threads, torch version,
    kernels and command), so every machine charges the same costs and a task's returns do not
    depend on where it runs.

    Raises:
        ValueError: none ships for this configuration (the message names the ways out:
            ``cost_profile="measured"`` for this machine's costs, ``"analytic"``).
    """
    key = reference_key(bundle, heads, k_max, obs)
    path = packaged_file(PACKAGED_PROFILES, key, "cost profile")
    if path is None:
        raise ValueError(f"No reference cost profile ships for this model, exit heads, {k_max} positions and "
                         "observation (it ships for the registered tasks' settings): use cost_profile='measured' "
                         "(timed on this machine) or 'analytic'.")
    return CostProfile.load(path)


def profile_positions(k_max: int, context_lengths: Sequence[int] = (), context_draft: int = 0) -> int:
    """The speculation length a cost profile must be measured for (it times k = 1 .. that + 1
    verified positions) to cover every round of a decoder: exit drafts of up to ``k_max`` tokens
    and context drafts of up to ``context_draft`` or ``max(context_lengths)`` copied tokens.
    A profile extrapolates linearly past the positions it timed, which made copies longer than
    ``k_max`` look almost free (measured in ``docs/experiments.md``, "The cost profile")."""
    return max(int(k_max), int(context_draft), *(int(c) for c in context_lengths))


def overhead_probe(bundle: ModelBundle, heads: ExitHeads, k_max: int, obs: ObservationConfig):
    """A zero-argument callable doing one round's observation work and a typical policy forward
    (a 2 x 256 MLP Q-network), for :func:`~lede_env.costs.measure_profile`."""
    n_ex = len(heads.exit_layers)
    builder = ObservationBuilder(obs, bundle.stack.hidden_size, n_ex, bundle.stack.num_layers, k_max,
                                 bundle.stack.head_weight.shape[0], tuple(heads.exit_layers))
    n_stat = builder.stat_exits
    hid = torch.randn(n_stat, bundle.stack.hidden_size, dtype=bundle.stack.dtype, device=bundle.stack.device)
    mlp = _probe_net(builder, 1 + n_ex * k_max)

    @torch.no_grad()
    def probe():
        top1, ent, arg = heads.feature_stats(hid, n_stat)
        o = builder.build(None if builder.compact else hid[-1].float().cpu().numpy(), top1.cpu().numpy(),
                          ent.cpu().numpy(), (arg == 0).float().cpu().numpy(), [1, 2, 3], 0.5)
        mlp(torch.from_numpy(builder.flatten(o)).unsqueeze(0)).argmax(-1)

    return probe


def _probe_net(builder: ObservationBuilder, n_actions: int) -> torch.nn.Module:
    """A typical agent's Q-network for this observation: 2 hidden layers of 64 (compact
    observation) or 256 (full)."""
    width = 64 if builder.compact else 256  # the compact observation's agents are small MLPs
    return torch.nn.Sequential(torch.nn.Linear(builder.flat_dim, width), torch.nn.ReLU(), torch.nn.Linear(width, width),
                               torch.nn.ReLU(), torch.nn.Linear(width, n_actions))
