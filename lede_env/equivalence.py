"""Checking that a decoder's greedy output is the full model's, position by position.

In fp32, :class:`~lede_env.decoding.SelfSpeculativeDecoder` emits exactly what plain greedy
decoding emits, whatever the actions (``tests/lede_env/test_decoding.py``). In bf16 or fp16 it
cannot promise that: verifying K+1 positions in one batched pass of layers E+1..L and running
one-token AR steps round differently, so a near-tie between two tokens can go either way, and
after one flipped token the continuation is a different sequence. What holds in every dtype is
a per-position guarantee (the self-speculation lossless property of LayerSkip, arXiv 2404.16710,
stated with rounding in mind):

    every emitted token is the full model's argmax at its position given the emitted prefix,
    as one teacher-forced pass of prompt + generated in the same dtype computes it, except at
    near-ties whose logit margin is within the dtype's rounding noise.

:func:`teacher_forced_check` checks this. At generated position j it takes the teacher-forced
logits ``z`` (the row predicting ``generated[j]``) and the *margin*
``m_j = max(z) - z[generated[j]]`` (logit units, >= 0; 0 when the emitted token attains the
maximum, ties included). Position j is

- *exact* if ``m_j == 0``;
- a *near-tie* if ``0 < m_j <= tol_j``;
- a *violation* if ``m_j > tol_j``.

Default tolerance (:func:`default_tolerance`): ``tol_j = TOLERANCE_ULPS[dtype] * eps(dtype) *
max|z|`` (logits), i.e. a number of "ulps" of the position's largest |logit| (``eps`` is
``torch.finfo(dtype).eps``: 2**-23 for fp32, 2**-7 for bf16, 2**-10 for fp16). Rounding noise in
a logit ``w_v . h`` scales with the magnitude of the dot product's terms, for which max|z| is
the natural yardstick. If the decoder picks the argmax of its own logits ``z'`` at a position
whose teacher-forced top two tokens are a and b, it can emit b only when the change of the gap
``|(z'_a - z'_b) - (z_a - z_b)|`` (the *pair noise*) exceeds the teacher-forced gap, and b's
margin is then below that pair noise. So the tolerance must cover the largest pair noise.

The pair noise is measured with ``benchmarks/bf16_equivalence.py`` (the decoder's verifier
logits captured at every emitted position against one teacher-forced pass), in ulps of max|z|;
the measurements are in ``docs/guarantees.md`` ("Greedy equivalence in fp32 and bf16").

``TOLERANCE_ULPS`` is the smallest power of two at least 1.5 times the largest measured pair
noise: 4 for bf16 and fp16, 32 for fp32. It is not 0 in fp32, where every measured emitted token
was exactly the teacher-forced argmax, because fp32 pair noise is not 0 either (other kernels and
matrix shapes: the decoder's passes of 1 to K+1 positions against one long teacher-forced pass),
so a genuine tie closer than that could flip through no fault of the decoder. The tolerance
stays far below any real error: a wrong token has a margin of whole logits
(``tests/lede_env/test_bf16.py`` checks that one is reported). The price of the tolerance is that
at positions whose teacher-forced top-2 gap is within it either token passes (the benchmark's
``gap <= tol`` column).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence, Union

import torch

from .layers import LayerStack

#: How many "ulps" of a position's largest |logit| (units of ``eps(dtype) * max|z|``) a margin may
#: reach and still count as a near-tie, per dtype (the module docstring gives the measurements).
TOLERANCE_ULPS: dict[torch.dtype, float] = {torch.float32: 32.0, torch.bfloat16: 4.0, torch.float16: 4.0}


def default_tolerance(dtype: torch.dtype, max_abs_logit: torch.Tensor) -> torch.Tensor:
    """Rounding-noise tolerance of a margin, per position.

    Args:
        dtype: the dtype the logits were computed in (the model's weights).
        max_abs_logit: [n] float32, ``max_v |z_v|`` at each position (logits).

    Returns:
        [n] float32 ``TOLERANCE_ULPS[dtype] * torch.finfo(dtype).eps * max_abs_logit`` (logits).

    Raises:
        ValueError: ``dtype`` is not a floating-point dtype with a known tolerance.
    """
    if dtype not in TOLERANCE_ULPS:
        raise ValueError(f"No default tolerance for dtype {dtype}; choose one of "
                         f"{sorted(str(d) for d in TOLERANCE_ULPS)} or pass tolerance= explicitly.")
    return TOLERANCE_ULPS[dtype] * torch.finfo(dtype).eps * max_abs_logit.float()


@dataclass
class PositionCheck:
    """One generated position that is not exact.

    Attributes:
        index: position in ``generated`` (0 = the first generated token).
        token: the emitted token id.
        argmax: the teacher-forced argmax (lowest id among ties).
        margin: ``max(z) - z[token]`` in logits (> 0).
        tolerance: the tolerance it was compared with, in logits.
    """

    index: int
    token: int
    argmax: int
    margin: float
    tolerance: float


@dataclass
class EquivalenceReport:
    """Result of :func:`teacher_forced_check`.

    Attributes:
        dtype: dtype of the model the check ran in (e.g. ``"torch.bfloat16"``).
        positions: generated positions checked (``len(generated)``).
        exact: positions whose emitted token attains the maximum teacher-forced logit.
        near_ties: positions with ``0 < margin <= tolerance``.
        violations: positions with ``margin > tolerance``: the emitted token is not the model's
            greedy choice, beyond rounding.
        max_margin: largest margin over all positions (logits; 0.0 if every position is exact).
        tolerance_rule: how the tolerance was set (``"4 ulp of max|logit| (torch.bfloat16)"``
            or ``"absolute 0.5"``).
    """

    dtype: str
    positions: int
    exact: int
    near_ties: list[PositionCheck] = field(default_factory=list)
    violations: list[PositionCheck] = field(default_factory=list)
    max_margin: float = 0.0
    tolerance_rule: str = ""

    @property
    def ok(self) -> bool:
        """True when no position is a violation."""
        return not self.violations

    def as_dict(self) -> dict:
        """JSON-serialisable form (``ok`` included)."""
        d = asdict(self)
        d["ok"] = self.ok
        return d


def _as_ids(x: Union[torch.Tensor, Sequence[int]], what: str) -> list[int]:
    if isinstance(x, torch.Tensor):
        if x.dim() == 2 and x.shape[0] == 1:
            x = x[0]
        if x.dim() != 1:
            raise ValueError(f"{what} must be a 1-D sequence of token ids (or [1, n]), got shape {tuple(x.shape)}.")
        return [int(t) for t in x.tolist()]
    return [int(t) for t in x]


@torch.no_grad()
def teacher_forced_logits(stack: LayerStack, prompt_ids: Union[torch.Tensor, Sequence[int]],
                          generated: Sequence[int]) -> torch.Tensor:
    """Full-model logits predicting each generated token, from one teacher-forced pass.

    Runs ``prompt + generated[:-1]`` through every layer at once (the stack's kernels, its
    dtype), then the final norm and the full LM head on the positions that predict
    ``generated``.

    Args:
        stack: the model's :class:`LayerStack`.
        prompt_ids: [P] (or [1, P]) int64 prompt ids, P >= 1.
        generated: G >= 1 generated token ids.

    Returns:
        [G, V] logits in the model's dtype; row j predicts ``generated[j]``.

    Raises:
        ValueError: as :func:`teacher_forced_check`.
    """
    prompt = _as_ids(prompt_ids, "prompt_ids")
    gen = _as_ids(generated, "generated")
    _validate(stack, prompt, gen)
    P, G = len(prompt), len(gen)
    ids = torch.tensor([prompt + gen[:-1]], device=stack.device)
    with stack.kernels_active():
        cache = stack.new_cache()
        h = stack.run(stack.embed(ids), 0, stack.num_layers, cache, 0)
        normed = stack.norm(h[0, P - 1:P - 1 + G])  # [G, d]
        return stack.head_logits(normed)


def _validate(stack: LayerStack, prompt: list[int], gen: list[int]) -> None:
    if not prompt:
        raise ValueError("prompt_ids is empty: the check needs at least one prompt token.")
    if not gen:
        raise ValueError("generated is empty: there is no generated position to check.")
    V = stack.head_weight.shape[0]
    for what, seq in (("prompt_ids", prompt), ("generated", gen)):
        bad = [t for t in seq if not 0 <= t < V]
        if bad:
            raise ValueError(f"{what} holds token id {bad[0]}, outside the vocabulary 0..{V - 1}.")
    ctx = getattr(stack.model.config, "max_position_embeddings", None)
    n = len(prompt) + len(gen) - 1
    if ctx is not None and n > ctx:
        raise ValueError(f"prompt ({len(prompt)}) + generated ({len(gen)}) - 1 = {n} positions exceed the "
                         f"model's context of {ctx}.")


@torch.no_grad()
def teacher_forced_check(stack: LayerStack, prompt_ids: Union[torch.Tensor, Sequence[int]],
                         generated: Sequence[int], tolerance: Optional[float] = None) -> EquivalenceReport:
    """Check that every generated token is the full model's greedy choice at its position.

    One teacher-forced pass (:func:`teacher_forced_logits`) gives the logits ``z_j`` [V]
    predicting ``generated[j]``; the margin ``max(z_j) - z_j[generated[j]]`` (computed in float32
    from the dtype's logits) is compared with the tolerance (module docstring).

    Args:
        stack: the model's :class:`LayerStack` (the dtype of its weights is the dtype checked).
        prompt_ids: [P] or [1, P] int64 tensor, or a list, of prompt ids (P >= 1).
        generated: the G >= 1 generated ids, as the decoder emitted them (an EOS included).
        tolerance: ``None`` for :func:`default_tolerance` (``TOLERANCE_ULPS[dtype]`` ulps of each
            position's max |logit|), else an absolute tolerance >= 0 in logits for every
            position (``0.0``: the emitted token must attain the maximum logit).

    Returns:
        An :class:`EquivalenceReport`; ``report.ok`` when there is no violation.

    Raises:
        ValueError: an empty prompt or generation, a tensor that is not 1-D (or [1, n]), a token
            id outside the vocabulary, a sequence longer than the model's context, a negative
            tolerance, or a dtype without a default tolerance.
    """
    if tolerance is not None and not tolerance >= 0:
        raise ValueError(f"tolerance must be >= 0 (logits) or None for the dtype's default, got {tolerance}.")
    gen = _as_ids(generated, "generated")
    return check_logits(teacher_forced_logits(stack, prompt_ids, gen), gen, stack.dtype, tolerance)


def check_logits(logits: torch.Tensor, generated: Sequence[int], dtype: Optional[torch.dtype] = None,
                 tolerance: Optional[float] = None) -> EquivalenceReport:
    """The margin test of :func:`teacher_forced_check` on logits already computed.

    Args:
        logits: [G, V] teacher-forced logits (row j predicts ``generated[j]``), any float dtype.
        generated: the G emitted token ids.
        dtype: dtype the logits were computed in, for the default tolerance (``None``:
            ``logits.dtype``).
        tolerance: as in :func:`teacher_forced_check`.

    Returns:
        An :class:`EquivalenceReport`.

    Raises:
        ValueError: ``logits`` is not [len(generated), V] with G >= 1, a token id is outside
            0..V-1, the tolerance is negative, or ``dtype`` has no default tolerance.
    """
    gen = _as_ids(generated, "generated")
    dtype = logits.dtype if dtype is None else dtype
    if logits.dim() != 2 or logits.shape[0] != len(gen) or not gen:
        raise ValueError(f"logits must be [G, V] with G = len(generated) = {len(gen)} >= 1, "
                         f"got shape {tuple(logits.shape)}.")
    if any(not 0 <= t < logits.shape[1] for t in gen):
        raise ValueError(f"generated holds a token id outside the vocabulary 0..{logits.shape[1] - 1}.")
    if tolerance is not None and not tolerance >= 0:
        raise ValueError(f"tolerance must be >= 0 (logits) or None for the dtype's default, got {tolerance}.")
    z = logits.float()
    tokens = torch.tensor(gen, device=z.device)
    top, arg = z.max(-1)
    margin = top - z.gather(1, tokens.view(-1, 1))[:, 0]
    if tolerance is None:
        tol = default_tolerance(dtype, z.abs().max(-1).values)
        rule = f"{TOLERANCE_ULPS[dtype]:g} ulp of max|logit| ({dtype})"
    else:
        tol = torch.full_like(margin, float(tolerance))
        rule = f"absolute {float(tolerance):g}"
    report = EquivalenceReport(dtype=str(dtype), positions=len(gen), exact=int((margin == 0).sum()),
                               max_margin=float(margin.max()), tolerance_rule=rule)
    for j in (margin > 0).nonzero()[:, 0].tolist():
        pc = PositionCheck(j, gen[j], int(arg[j]), float(margin[j]), float(tol[j]))
        (report.violations if margin[j] > tol[j] else report.near_ties).append(pc)
    return report


def first_divergence(a: Sequence[int], b: Sequence[int]) -> Optional[int]:
    """Index of the first position where two token sequences differ (a length difference counts
    at the shorter one's end); ``None`` if they are equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))
