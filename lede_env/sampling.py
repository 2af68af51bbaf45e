"""Speculative sampling: drafts sampled from the exit head, accepted so that the output is
distributed exactly as plain sampling from the model (Leviathan et al., arXiv 2211.17192; Chen
et al., arXiv 2302.01318).

- :class:`Sampling` - the user's settings (temperature, top-k, top-p, seed) and the warped distribution.
- :class:`SpeculativeSampler` - one generation's sampling state: its random generator and the
  draft distributions of the round being played.
- :func:`speculative_verify` - the acceptance rule of one round, as "verifier tokens" for the
  shared greedy accept rule (:func:`lede_env.mdp.accept`); :func:`speculative_tree_verify` the
  same for a token tree (:func:`lede_env.mdp.accept_tree`).

Distributions are copied to the CPU and drawn with a CPU generator, so a seed gives the same
tokens on every device.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch


@dataclass
class Sampling:
    """Temperature / top-k / nucleus sampling for :meth:`SelfSpeculativeDecoder.generate`.

    Drafts are sampled from the exit head's warped distribution q and accepted by speculative
    sampling (Leviathan et al., arXiv 2211.17192; Chen et al., arXiv 2302.01318): draft token d
    is kept with probability min(1, p(d) / q(d)); at the first rejection the token is drawn from
    the normalised residual max(0, p - q); after a fully accepted round the bonus token is drawn
    from p. Every emitted token is then distributed exactly as in plain sampling from the
    model's warped distribution p, whatever the actions.

    The warping is transformers' (``TemperatureLogitsWarper``, ``TopKLogitsWarper``,
    ``TopPLogitsWarper``, in that order): logits / temperature, then only the tokens whose logit
    is at least the k-th largest, then the nucleus of the renormalised distribution.

    Attributes:
        temperature: > 0; logits are divided by it.
        top_p: nucleus mass in (0, 1]: the smallest set of most likely tokens whose probability
            reaches ``top_p`` is kept (applied to p and to q alike).
        seed: seed of the generation's own ``torch.Generator`` (``None``: drawn from torch's global
            generator, so ``torch.manual_seed`` makes a run reproducible as it does for
            transformers' own sampling).
        top_k: keep the ``top_k`` most likely tokens (ties at the k-th logit kept, as
            transformers does; applied to p and to q alike, q over the draft vocabulary);
            ``None`` or 0: off.

    Raises:
        ValueError: temperature <= 0, top_p outside (0, 1], or top_k not a non-negative integer.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    seed: Optional[int] = None
    top_k: Optional[int] = None

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 (use sampling=None for greedy), got {self.temperature}.")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
        if self.top_k is not None:
            if isinstance(self.top_k, bool) or int(self.top_k) != self.top_k or self.top_k < 0:
                raise ValueError(f"top_k must be a non-negative integer (0 or None: off), got {self.top_k!r}.")
            self.top_k = int(self.top_k) or None

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Warped distribution. [..., V] logits -> [..., V] float32 probabilities."""
        x = logits.float() / self.temperature
        if self.top_k is not None and self.top_k < x.shape[-1]:
            kth = x.topk(self.top_k, -1).values[..., -1:]
            x = x.masked_fill(x < kth, float("-inf"))
        p = torch.softmax(x, -1)
        if self.top_p < 1:
            sp, idx = p.sort(-1, descending=True)
            drop = sp.cumsum(-1) - sp >= self.top_p  # keeps at least the most likely token
            sp = sp.masked_fill(drop, 0.0)
            p = torch.zeros_like(p).scatter_(-1, idx, sp)
            p = p / p.sum(-1, keepdim=True)
        return p


def speculative_verify(draft: Sequence[int], q: Sequence[torch.Tensor], q_ids: torch.Tensor, p: torch.Tensor,
                       generator: Optional[torch.Generator] = None) -> list[int]:
    """Speculative-sampling verification of one round, as "verifier tokens" for :func:`accept`.

    Args:
        draft: d_1..d_K draft tokens (full-vocabulary ids).
        q: K draft distributions, each [V_d] float32 over the draft vocabulary ``q_ids``, or
            ``None`` for a deterministic proposal (a token copied from the context: q is a point
            mass, so it is accepted with probability p(d) and a rejection resamples from p
            without d).
        q_ids: [V_d] int64 full-vocabulary id of each draft-vocabulary entry.
        p: [n, V] float32 target distributions at the n = K or K + 1 verified positions.
        generator: random source.

    Returns:
        n tokens: d_1..d_a (accepted), then the token drawn at position a + 1 (from the residual
        after a rejection, or from p at the bonus position), then -1 placeholders (never emitted);
        :func:`~lede_env.mdp.accept` on it emits exactly the speculative-sampling output.
    """
    n = p.shape[0]
    out: list[int] = []
    for j in range(n):
        if j < len(draft):
            d = draft[j]
            qd = q[j][(q_ids == d).nonzero()[0, 0]] if q[j] is not None else 1.0
            u = torch.rand((), generator=generator)
            if u * qd < p[j, d]:  # accept with probability min(1, p/q)
                out.append(d)
                continue
            resid = p[j].clone()
            if q[j] is not None:
                resid.index_add_(0, q_ids, -q[j])
            else:
                resid[d] -= 1.0  # the point mass at d
            resid.clamp_(min=0)
            if not float(resid.sum()) > 0:  # p == q up to rounding: any draw from p is right
                resid = p[j]
            out.append(int(torch.multinomial(resid / resid.sum(), 1, generator=generator)))
        else:
            out.append(int(torch.multinomial(p[j], 1, generator=generator)))
        break
    return out + [-1] * (n - len(out))


def speculative_tree_verify(tokens: Sequence[int], parents: Sequence[int], p: torch.Tensor,
                            generator: Optional[torch.Generator] = None) -> list[int]:
    """Speculative-sampling verification of a token tree, as "verifier tokens" for
    :func:`~lede_env.mdp.accept_tree`.

    A tree's nodes are deterministic proposals (point masses), so multi-draft recursive
    rejection sampling (SpecInfer arXiv 2305.09781, SpecTr arXiv 2310.15141) at a node with
    children c_1..c_m (try c_1 with probability p(c_1), then c_2 against the residual without
    c_1, ...; the residual without every child at the end) reduces to: draw x from p at the node;
    if x is a child's token, descend to that child, else emit x and stop. Every emitted token is
    then distributed as plain sampling from p.

    Args:
        tokens, parents: the tree's n nodes (as :func:`~lede_env.mdp.tree_branch`).
        p: [n + 1, V] float32 target distributions at the root (row 0) and at each node (row i + 1).
        generator: random source.

    Returns:
        n + 1 tokens: the draw at every node the walk visits (root first), -1 at the others
        (never read by :func:`~lede_env.mdp.tree_branch`).

    Raises:
        ValueError: ``p`` without n + 1 rows.
    """
    n = len(tokens)
    if p.shape[0] != n + 1:
        raise ValueError(f"speculative_tree_verify: p has {p.shape[0]} rows for a tree of {n} nodes (give n + 1).")
    kids = {(int(par), int(t)): i for i, (par, t) in enumerate(zip(parents, tokens))}
    out, node = [-1] * (n + 1), -1
    while True:
        x = int(torch.multinomial(p[node + 1], 1, generator=generator))
        out[node + 1] = x
        node = kids.get((node, x), -2)
        if node == -2:
            return out


@dataclass
class SpeculativeSampler:
    """The sampling state of one generation: settings, random generator, and the draft
    distributions q of the round in progress (kept between drafting and verification).

    Args:
        sampling: the settings.
        draft_ids: [V_d] int64 full-vocabulary id of each draft-vocabulary entry (any device).
    """

    sampling: Sampling
    draft_ids: torch.Tensor
    generator: torch.Generator = field(init=False)
    q: list = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        self.draft_ids = self.draft_ids.cpu()
        self.generator = torch.Generator(device="cpu")
        seed = self.sampling.seed
        if seed is None:  # from torch's global generator: torch.manual_seed(s) reproduces the run
            seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
        self.generator.manual_seed(int(seed))

    def draw_draft(self, logits: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Sample one draft token from the exit head's warped distribution and keep q for
        verification. [V_d] logits -> ([1] int64 full-vocabulary id on the CPU, max q)."""
        q = self.sampling.probs(logits).cpu()
        self.q.append(q)
        k = torch.multinomial(q, 1, generator=self.generator)
        return self.draft_ids[k], float(q.max())

    def verify(self, draft: Sequence[int], target_logits: torch.Tensor) -> list[int]:
        """Verifier tokens of the round (see :func:`speculative_verify`); forgets its q.
        ``target_logits``: [n, V] full-model logits at the verified positions."""
        p = self.sampling.probs(target_logits).cpu()
        q, self.q = self.q, []
        return speculative_verify(draft, q, self.draft_ids, p, self.generator)

    def verify_tree(self, tokens: Sequence[int], parents: Sequence[int], target_logits: torch.Tensor) -> list[int]:
        """Verifier tokens of a token-tree round (:func:`speculative_tree_verify`).
        ``target_logits``: [n + 1, V] full-model logits at the root and the n nodes."""
        self.q = []
        return speculative_tree_verify(tokens, parents, self.sampling.probs(target_logits).cpu(), self.generator)
