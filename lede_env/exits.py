"""Exit heads: turning the hidden state after layer E into draft tokens.

The kinds (:attr:`ExitHeads.kind`):

- ``"lens"`` - the logit lens: final RMSNorm + LM head on the layer-E hidden state. Right for
  checkpoints trained for early exit (LayerSkip, arXiv 2404.16710).
- ``"affine"`` - a per-exit affine translator ``h -> norm(h) @ W_E + b_E`` fitted by ridge
  regression towards the final normed hidden state, then the LM head (the tuned-lens idea,
  Belrose et al., arXiv 2303.08112). The ridge pulls ``W_E`` towards the identity, so a strong
  penalty gives back the logit lens. Fit it on the model's *own* greedy continuations.
- ``"affine-kl"`` - the same translator, ridge-fitted, then fine-tuned by KL to the final
  layer's distribution over the draft vocabulary (:func:`finetune_kl`): more top-1 agreement
  at shallow exits for a fit of seconds per exit on a CPU.
- ``"affine-kl-prev"`` - ``"affine-kl"``, and a round's *first* draft token comes from a second
  translator that also reads the final normed hidden state of the position before it, which the
  verifier has always computed (the one whose argmax is the pending token): EAGLE's top-layer
  feature (arXiv 2401.15077) given to an early exit. ``[norm(h_E), final(t-1)] @ W + b``,
  ridge-fitted towards the affine-kl translator (:func:`fit_first`). Later draft tokens of the
  round use the affine-kl head (their previous position is not verified yet), and the draft
  probability goes through the affine-kl heads' acceptance calibration. Held-out agreement of
  each kind: ``docs/performance.md`` ("Exit heads") and ``docs/experiments.md``.

Draft heads may score only a truncated, frequency-ranked vocabulary of ``draft_vocab`` tokens
(FR-Spec idea, arXiv 2502.14856): on small models the full LM head costs as much as several
decoder layers. Verification always uses the full vocabulary, so output stays lossless.

Per-exit *features* for the policy's observation (:meth:`ExitHeads.feature_stats`) use each
exit's translator and an even smaller vocabulary (``feature_vocab`` most frequent tokens), so
that computing them for every exit costs two small batched products per round.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from typing import Optional, Sequence

import torch
from torch import nn

from .layers import LayerStack
from .stopping import AcceptanceCalibration

HEAD_KINDS = ("lens", "affine", "affine-kl", "affine-kl-prev")
#: bumped whenever the observation features computed from exit heads change (cache keys)
FEATURES_VERSION = 2


def rank_vocabulary(vocab_size: int, sequences: Sequence[Sequence[int]]) -> torch.Tensor:
    """Token ids ordered by frequency in ``sequences`` (most frequent first), ties and unseen
    tokens by id (low BPE ids are the tokenizer's earliest, most frequent merges).

    Returns:
        [vocab_size] int64 permutation of ``range(vocab_size)``.
    """
    counts = Counter(int(t) for s in sequences for t in s)
    order = sorted(range(vocab_size), key=lambda t: (-counts.get(t, 0), t))
    return torch.tensor(order, dtype=torch.long)


class ExitHeads(nn.Module):
    """Draft heads for a set of exit layers, sharing the model's final norm and LM head.

    Args:
        stack: the model's :class:`~lede_env.layers.LayerStack`.
        exit_layers: candidate exit layers, strictly increasing, each in ``1 .. L-1``.
        kind: one of :data:`HEAD_KINDS`; ``"affine"`` and ``"affine-kl"`` use translators.
        vocab_rank: [V] int64 frequency ranking of the vocabulary (see :func:`rank_vocabulary`);
            ``None`` keeps token-id order.
        draft_vocab: number of top-ranked tokens the draft head scores (``None`` = all V).
        feature_vocab: number of top-ranked tokens used for observation features.

    Raises:
        ValueError: bad exit layers, kind or vocabulary sizes.
    """

    def __init__(
        self,
        stack: LayerStack,
        exit_layers: Sequence[int],
        kind: str = "lens",
        vocab_rank: Optional[torch.Tensor] = None,
        draft_vocab: Optional[int] = None,
        feature_vocab: int = 1024,
    ) -> None:
        super().__init__()
        exit_layers = validate_exit_layers(exit_layers, stack.num_layers)
        if kind not in HEAD_KINDS:
            raise ValueError(f"Unknown exit-head kind {kind!r}; choose one of {HEAD_KINDS}.")
        V = stack.head_weight.shape[0]
        if vocab_rank is None:
            vocab_rank = torch.arange(V)
        if vocab_rank.shape != (V,):
            raise ValueError(f"vocab_rank must have shape [{V}], got {tuple(vocab_rank.shape)}.")
        draft_vocab = V if draft_vocab is None else int(draft_vocab)
        if not 1 <= draft_vocab <= V:
            raise ValueError(f"draft_vocab={draft_vocab} must be in 1..{V} (the vocabulary size).")
        feature_vocab = min(int(feature_vocab), V)
        self.stack = stack
        self.exit_layers = tuple(exit_layers)
        self.kind = kind
        #: whether each exit has an affine translator (every kind but the logit lens)
        self.translated = kind != "lens"
        #: whether a round's first draft token also reads the previous position's final hidden
        #: state (``"affine-kl-prev"``: :meth:`first_logits`)
        self.prev = kind == "affine-kl-prev"
        self.draft_vocab = draft_vocab
        self.feature_vocab = feature_vocab
        self.register_buffer("vocab_rank", vocab_rank.to(torch.long), persistent=False)
        d = stack.hidden_size
        n = len(exit_layers)
        # Affine translators, identity by default (== logit lens).
        eye = torch.eye(d, dtype=stack.dtype, device=stack.device)
        self.register_buffer("weight", eye.repeat(n, 1, 1), persistent=False)
        self.register_buffer("bias", torch.zeros(n, d, dtype=stack.dtype, device=stack.device), persistent=False)
        if self.prev:  # first-token translators [norm(h_E), final(t-1)] -> d: the logit lens until fitted
            zero = torch.zeros(n, d, d, dtype=stack.dtype, device=stack.device)
            self.register_buffer("first_weight", torch.cat([eye.repeat(n, 1, 1), zero], 1), persistent=False)
            self.register_buffer("first_bias", torch.zeros(n, d, dtype=stack.dtype, device=stack.device),
                                 persistent=False)
        #: per-exit acceptance against the draft probability (:func:`calibrate_acceptance`), or None
        self.acceptance: Optional[AcceptanceCalibration] = None
        self._refresh_vocab()

    def _refresh_vocab(self) -> None:
        W = self.stack.head_weight.detach()
        self.draft_ids = self.vocab_rank[: self.draft_vocab].to(W.device)
        self.draft_w = W.index_select(0, self.draft_ids).contiguous()  # [V_d, d]
        self.feature_ids = self.vocab_rank[: self.feature_vocab].to(W.device)
        self.feature_w = W.index_select(0, self.feature_ids).contiguous()  # [V_f, d]

    def index(self, exit_layer: int) -> int:
        """Position of ``exit_layer`` in :attr:`exit_layers` (``ValueError`` if absent)."""
        try:
            return self.exit_layers.index(exit_layer)
        except ValueError:
            raise ValueError(f"Exit layer {exit_layer} is not one of {self.exit_layers}.") from None

    def translate(self, hidden: torch.Tensor, i: int) -> torch.Tensor:
        """Normed, translated hidden state fed to the LM head. [..., d] -> [..., d]."""
        h = self.stack.norm(hidden)
        if self.translated:
            h = torch.addmm(self.bias[i], h.reshape(-1, h.shape[-1]), self.weight[i]).view(h.shape)
        return h

    @torch.no_grad()
    def draft_tokens(self, hidden: torch.Tensor, i: int) -> torch.Tensor:
        """Greedy draft tokens from exit ``exit_layers[i]``.

        Args:
            hidden: [..., d] output of decoder layer ``exit_layers[i]``.
            i: index of the exit in :attr:`exit_layers`.

        Returns:
            [...] int64 token ids (in the full vocabulary).
        """
        return self.draft_ids[self.draft_logits(hidden, i).argmax(-1)]

    @torch.no_grad()
    def draft_logits(self, hidden: torch.Tensor, i: int) -> torch.Tensor:
        """Draft-head logits over the draft vocabulary (token ids: :attr:`draft_ids`).

        Args:
            hidden: [..., d] output of decoder layer ``exit_layers[i]``.

        Returns:
            [..., V_d] float32 logits.
        """
        return self.stack.linear(self.translate(hidden, i), self.draft_w).float()

    @torch.no_grad()
    def draft_with_confidence(self, hidden: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Greedy draft tokens and their draft-head probability.

        Args:
            hidden: [..., d] output of decoder layer ``exit_layers[i]``.
            i: index of the exit in :attr:`exit_layers`.

        Returns:
            ``(tokens, prob)``: [...] int64 token ids (full vocabulary) and [...] float32 top-1
            probability of the draft head's softmax over the draft vocabulary (the confidence
            that confidence-threshold drafting compares with its stop threshold).
        """
        logits = self.draft_logits(hidden, i)
        top, arg = logits.max(-1)
        prob = torch.exp(top - torch.logsumexp(logits, -1))
        return self.draft_ids[arg], prob

    @torch.no_grad()
    def first_logits(self, hidden: torch.Tensor, prev_final: torch.Tensor, i: int) -> torch.Tensor:
        """Draft-head logits for a round's first draft token (token ids: :attr:`draft_ids`): with
        ``"affine-kl-prev"`` heads from ``[norm(hidden), prev_final]`` through the exit's
        first-token translator, else :meth:`draft_logits` (``prev_final`` unused).

        Args:
            hidden: [..., d] output of decoder layer ``exit_layers[i]`` at the pending token.
            prev_final: [..., d] final normed hidden state at the position before it.

        Returns:
            [..., V_d] float32 logits.
        """
        if not self.prev:
            return self.draft_logits(hidden, i)
        h = self.stack.norm(hidden)
        x = torch.cat([h, prev_final.to(h.dtype).expand_as(h)], -1)
        t = torch.addmm(self.first_bias[i], x.reshape(-1, x.shape[-1]), self.first_weight[i]).view(h.shape)
        return self.stack.linear(t, self.draft_w).float()

    @torch.no_grad()
    def first_with_confidence(self, hidden: torch.Tensor, prev_final: torch.Tensor,
                              i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`draft_with_confidence` for a round's first draft token (:meth:`first_logits`).

        Returns:
            ``(tokens, prob)``: [...] int64 token ids (full vocabulary), [...] float32 top-1
            probability over the draft vocabulary.
        """
        logits = self.first_logits(hidden, prev_final, i)
        top, arg = logits.max(-1)
        return self.draft_ids[arg], torch.exp(top - torch.logsumexp(logits, -1))

    @torch.no_grad()
    def feature_stats(self, hidden: torch.Tensor, n: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Statistics of every exit's head over the feature vocabulary.

        Each exit's hidden state goes through that exit's translator (the draft head's, so the
        features describe what the draft would do), then the LM head restricted to the
        ``feature_vocab`` most frequent tokens.

        Args:
            hidden: [..., n, d] hidden states after each of the first ``n`` exit layers (default:
                all of them) at some positions.

        Returns:
            ``(top1_prob, entropy, argmax)``: [..., n_exits] float32 probability of the top
            token, float32 entropy in nats, int64 argmax token id (full vocabulary).
        """
        h = self.stack.norm(hidden)
        n = len(self.exit_layers) if n is None else n
        if self.translated and n == 1 and h.dim() == 2:  # one exit (the compact observation): one addmm
            h = torch.addmm(self.bias[0], h, self.weight[0])
        elif self.translated:
            h = torch.einsum("...nd,nde->...ne", h, self.weight[:n]) + self.bias[:n]
        logits = self.stack.linear(h, self.feature_w)
        logp = torch.log_softmax(logits.float(), dim=-1)
        top, arg = logp.max(-1)
        ent = -(logp.exp() * logp).sum(-1)
        return top.exp(), ent, self.feature_ids[arg]

    def fingerprint(self) -> str:
        """Short hash of everything that changes the draft tokens (kind, exits, vocab, weights)."""
        h = hashlib.sha256()
        h.update(repr((self.kind, self.exit_layers, self.draft_vocab, self.feature_vocab, FEATURES_VERSION)).encode())
        h.update(self.vocab_rank[: max(self.draft_vocab, self.feature_vocab)].cpu().numpy().tobytes())
        if self.translated:
            h.update(self.weight.float().cpu().numpy().tobytes())
            h.update(self.bias.float().cpu().numpy().tobytes())
        if self.prev:
            h.update(self.first_weight.float().cpu().numpy().tobytes())
            h.update(self.first_bias.float().cpu().numpy().tobytes())
        return h.hexdigest()[:12]

    def state(self) -> dict[str, torch.Tensor]:
        """Tensors to save (safetensors; on the CPU): ``weight`` [n, d, d], ``bias`` [n, d], ``vocab_rank`` [V],
        with ``"affine-kl-prev"`` ``first_weight`` [n, 2d, d] and ``first_bias`` [n, d], and the
        acceptance calibration's ``accept_*`` tensors when there is one."""
        out = {"weight": self.weight.cpu().contiguous(), "bias": self.bias.cpu().contiguous(),
               "vocab_rank": self.vocab_rank.cpu().contiguous()}
        if self.prev:
            out |= {"first_weight": self.first_weight.cpu().contiguous(), "first_bias": self.first_bias.cpu().contiguous()}
        if self.acceptance is not None:
            out.update(self.acceptance.state())
        return out

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`state`. Raises ``ValueError`` on a shape mismatch or missing
        first-token translators."""
        keys = ("weight", "bias", "vocab_rank") + (("first_weight", "first_bias") if self.prev else ())
        for k in keys:
            if k not in tensors:
                raise ValueError(f"Exit-head tensors lack {k!r}: they were saved for another head kind than {self.kind!r}.")
            if tensors[k].shape != getattr(self, k).shape:
                raise ValueError(f"Exit-head tensor {k!r} has shape {tuple(tensors[k].shape)}, expected "
                                 f"{tuple(getattr(self, k).shape)}: it was fitted for another model or exit set.")
        self.weight = tensors["weight"].to(self.weight)
        self.bias = tensors["bias"].to(self.bias)
        if self.prev:
            self.first_weight = tensors["first_weight"].to(self.first_weight)
            self.first_bias = tensors["first_bias"].to(self.first_bias)
        self.vocab_rank = tensors["vocab_rank"].to(torch.long).cpu()
        self.acceptance = AcceptanceCalibration.from_state(tensors)
        if self.acceptance is not None and self.acceptance.rate.shape[0] != len(self.exit_layers):
            raise ValueError(f"The acceptance calibration covers {self.acceptance.rate.shape[0]} exits, expected "
                             f"{len(self.exit_layers)}: it was fitted for another exit set.")
        self._refresh_vocab()


def validate_exit_layers(exit_layers: Sequence[int], num_layers: int) -> tuple[int, ...]:
    """Check candidate exits: integers, strictly increasing, each in ``1 .. L-1``.

    Raises:
        ValueError: naming the offending value and the valid range.
    """
    exits = tuple(int(e) for e in exit_layers)
    if not exits:
        raise ValueError("exit_layers is empty: give at least one exit layer in 1..L-1.")
    for e in exits:
        if not 1 <= e <= num_layers - 1:
            raise ValueError(f"Exit layer {e} is outside 1..{num_layers - 1} (the model has {num_layers} layers).")
    if len(set(exits)) != len(exits):
        raise ValueError(f"exit_layers {list(exits)} has duplicates.")
    if list(exits) != sorted(exits):
        raise ValueError(f"exit_layers {list(exits)} must be sorted in increasing order.")
    return exits


def default_exit_layers(num_layers: int, step: int = 2) -> tuple[int, ...]:
    """Every ``step``-th layer below L (``2, 4, ..``), the design default; layer 1 for L <= 2."""
    exits = tuple(range(step, num_layers, step))
    return exits or (1,)


@torch.no_grad()
def teacher_forced(stack: LayerStack, ids: torch.Tensor, exit_layers: Sequence[int]):
    """One full forward pass over a whole sequence, keeping what traces and fitting need.

    Args:
        ids: [T] int64 token ids (prompt + continuation).
        exit_layers: layers whose outputs are kept.

    Returns:
        ``(exit_hidden, final_normed, verifier)``: [T, n_exits, d] hidden after each exit layer,
        [T, d] final normed hidden state, [T] int64 full-model argmax at each position.
    """
    with stack.kernels_active():
        cache = stack.new_cache()
        h = stack.embed(ids.view(1, -1).to(stack.device))
        rope = stack.positions(h, 0)
        taps = []
        prev = 0
        for e in exit_layers:
            h = stack.run(h, prev, e, cache, 0, rope)
            taps.append(h[0])
            prev = e
        h = stack.run(h, prev, stack.num_layers, cache, 0, rope)
        final = stack.norm(h[0])
        verifier = stack.greedy_tokens(final)
    return torch.stack(taps, 1), final, verifier


@torch.no_grad()
def fit_affine(
    heads: ExitHeads,
    sequences: Sequence[tuple[torch.Tensor, int]],
    ridge: float = 0.01,
) -> dict:
    """Fit each exit's affine translator by closed-form ridge regression.

    Minimises ``||norm(h_E) W + b - y||^2 + lam ||W - I||^2`` where ``y`` is the final normed
    hidden state, over every continuation position of ``sequences`` (the model's own greedy
    outputs: translators fitted on them agree better on held-out continuations than ones fitted
    on reference text, ``docs/experiments.md``). ``lam = ridge *
    mean(diag(X^T X))`` after centring, so ``ridge`` is scale-free.

    Args:
        heads: heads with translators (``"affine"`` or ``"affine-kl"``); updated in place.
        sequences: ``(ids [T] int64, n_prompt)`` pairs; positions ``n_prompt-1 .. T-2`` are used.
        ridge: relative ridge strength (> 0).

    Returns:
        ``{"positions": N, "agreement": {exit_layer: top-1 agreement on the fitting positions}}``.
    """
    if not heads.translated:
        raise ValueError("fit_affine needs heads with translators (kind 'affine' or 'affine-kl').")
    if ridge <= 0:
        raise ValueError(f"ridge must be > 0, got {ridge}.")
    xs, ys = [], []
    for ids, n_prompt in sequences:
        eh, final, _ = teacher_forced(heads.stack, ids, heads.exit_layers)
        sl = slice(max(n_prompt - 1, 0), ids.shape[0] - 1)
        xs.append(heads.stack.norm(eh[sl]))
        ys.append(final[sl])
    if not xs or sum(x.shape[0] for x in xs) < 2:
        raise ValueError("Not enough continuation positions to fit exit heads (need >= 2).")
    X = torch.cat(xs).double()  # [N, n, d]
    Y = torch.cat(ys).double()  # [N, d]
    d = Y.shape[1]
    eye = torch.eye(d, dtype=torch.float64, device=Y.device)
    my = Y.mean(0)
    Yc = Y - my
    for i in range(len(heads.exit_layers)):
        x = X[:, i]
        mx = x.mean(0)
        xc = x - mx
        xtx = xc.T @ xc
        lam = ridge * xtx.diagonal().mean()
        W = torch.linalg.solve(xtx + lam * eye, xc.T @ Yc + lam * eye)
        heads.weight[i] = W.to(heads.weight.dtype)
        heads.bias[i] = (my - mx @ W).to(heads.bias.dtype)
    return {"positions": int(X.shape[0])}


def finetune_kl(
    heads: ExitHeads,
    sequences: Sequence[tuple[torch.Tensor, int]],
    steps: int = 300,
    batch: int = 256,
    lr: float = 5e-4,
    seed: int = 0,
    max_epochs: float = 8.0,
) -> dict:
    """Fine-tune each exit's affine translator against the final layer's own predictions.

    Starting from the ridge fit (:func:`fit_affine`), minimises, over the draft vocabulary,
    ``KL(p_final || p_exit) + CE(p_exit, argmax p_final)`` with Adam on random mini-batches of
    positions (the tuned-lens objective, arXiv 2303.08112, plus a top-1 term since drafts are
    greedy). Every position of ``sequences`` is used, prompts included: targets are always the
    model's own final-layer distribution, so prompt positions add data without moving the
    target away from what the model would generate. What it adds over the ridge fit, per
    category, and what a low-rank non-linear adapter on top added: ``docs/experiments.md``
    ("Multi-domain calibration split").

    Args:
        heads: affine heads, already ridge-fitted; updated in place.
        sequences: ``(ids [T] int64, n_prompt)`` pairs (the model's greedy continuations).
        steps, batch, lr: Adam steps, positions per step, learning rate.
        seed: mini-batch sampling seed.
        max_epochs: cap on the passes over the positions (steps are cut to it).

    Returns:
        ``{"positions": N, "loss": {exit_layer: final mini-batch loss}}``.
    """
    if not heads.translated:
        raise ValueError("finetune_kl needs heads with translators (kind 'affine' or 'affine-kl').")
    if steps < 1 or batch < 1 or lr <= 0:
        raise ValueError(f"finetune_kl needs steps >= 1, batch >= 1, lr > 0; got {steps}, {batch}, {lr}.")
    xs, ys = [], []
    with torch.no_grad():
        for ids, _ in sequences:
            eh, final, _ = teacher_forced(heads.stack, ids, heads.exit_layers)
            xs.append(heads.stack.norm(eh[:-1]).float())
            ys.append(final[:-1].float())
    X = torch.cat(xs)  # [N, n, d]
    Wd = heads.draft_w.float()  # [V_d, d]
    with torch.no_grad():
        teacher = torch.log_softmax(torch.cat(ys) @ Wd.T, -1)  # [N, V_d]
        target = teacher.argmax(-1)
    g = torch.Generator().manual_seed(seed)
    losses = {}
    # at most ``max_epochs`` passes over the positions: a handful of positions (tests, tiny
    # calibration sets) gets a handful of steps instead of overfitting for ``steps`` of them
    steps = max(1, min(steps, math.ceil(max_epochs * X.shape[0] / batch)))
    for i, e in enumerate(heads.exit_layers):
        W = heads.weight[i].float().clone().requires_grad_(True)
        b = heads.bias[i].float().clone().requires_grad_(True)
        opt = torch.optim.Adam([W, b], lr=lr)
        with torch.enable_grad():
            for _ in range(steps):
                idx = torch.randint(0, X.shape[0], (min(batch, X.shape[0]),), generator=g).to(X.device)
                logp = torch.log_softmax((X[idx, i] @ W + b) @ Wd.T, -1)
                t = teacher[idx]
                loss = (t.exp() * (t - logp)).sum(-1).mean() + torch.nn.functional.nll_loss(logp, target[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        with torch.no_grad():
            heads.weight[i] = W.detach().to(heads.weight.dtype)
            heads.bias[i] = b.detach().to(heads.bias.dtype)
        losses[e] = float(loss.detach())
    return {"positions": int(X.shape[0]), "loss": losses}


@torch.no_grad()
def fit_first(heads: ExitHeads, sequences: Sequence[tuple[torch.Tensor, int]], ridge: float = 0.01) -> dict:
    """Fit each exit's first-token translator of ``"affine-kl-prev"`` heads by ridge regression.

    Minimises ``||[norm(h_E(t)), final(t-1)] W + b - final(t)||^2 + lam ||W - W0||^2`` over the
    continuation positions of ``sequences``, ``W0`` the exit's own (already fitted) translator
    stacked on zeros, so a huge ``ridge`` pulls it to the affine-kl translator; ``lam = ridge *
    mean(diag(X^T X))`` after centring, as :func:`fit_affine`.

    Args:
        heads: ``"affine-kl-prev"`` heads whose translators are fitted; updated in place.
        sequences: ``(ids [T] int64, n_prompt)`` pairs; positions ``max(n_prompt-1, 1) .. T-2``.
        ridge: relative ridge strength (> 0).

    Returns:
        ``{"positions": N}``.

    Raises:
        ValueError: heads of another kind, ``ridge`` <= 0, or fewer than 2 positions.
    """
    if not heads.prev:
        raise ValueError(f"fit_first needs 'affine-kl-prev' heads, got {heads.kind!r}.")
    if ridge <= 0:
        raise ValueError(f"ridge must be > 0, got {ridge}.")
    xs, ps, ys = [], [], []
    for ids, n_prompt in sequences:
        eh, final, _ = teacher_forced(heads.stack, ids, heads.exit_layers)
        sl = slice(max(n_prompt - 1, 1), ids.shape[0] - 1)
        xs.append(heads.stack.norm(eh[sl]))
        ps.append(final[sl.start - 1:sl.stop - 1])
        ys.append(final[sl])
    if not xs or sum(x.shape[0] for x in xs) < 2:
        raise ValueError("Not enough continuation positions to fit first-token heads (need >= 2).")
    X, P, Y = torch.cat(xs).double(), torch.cat(ps).double(), torch.cat(ys).double()
    d = Y.shape[1]
    eye = torch.eye(2 * d, dtype=torch.float64, device=Y.device)
    my = Y.mean(0)
    Yc = Y - my
    for i in range(len(heads.exit_layers)):
        x = torch.cat([X[:, i], P], 1)
        mx = x.mean(0)
        xc = x - mx
        xtx = xc.T @ xc
        lam = ridge * xtx.diagonal().mean()
        W0 = torch.cat([heads.weight[i].double(), torch.zeros(d, d, dtype=torch.float64, device=Y.device)], 0)
        W = torch.linalg.solve(xtx + lam * eye, xc.T @ Yc + lam * W0)
        heads.first_weight[i] = W.to(heads.first_weight.dtype)
        heads.first_bias[i] = (my - mx @ W).to(heads.first_bias.dtype)
    return {"positions": int(X.shape[0])}


@torch.no_grad()
def agreement(heads: ExitHeads, sequences: Sequence[tuple[torch.Tensor, int]]) -> dict[int, float]:
    """Top-1 agreement of each exit's draft token with the next token of ``sequences``
    (the model's greedy continuations) over their continuation positions; for
    ``"affine-kl-prev"`` heads, of a round's first draft token (:meth:`ExitHeads.first_logits`,
    given the final hidden state of the position before)."""
    hits = torch.zeros(len(heads.exit_layers))
    total = 0
    for ids, n_prompt in sequences:
        eh, final, _ = teacher_forced(heads.stack, ids, heads.exit_layers)
        sl = slice(max(n_prompt - 1, 1 if heads.prev else 0), ids.shape[0] - 1)
        target = ids[sl.start + 1: sl.stop + 1].to(eh.device)
        for i in range(len(heads.exit_layers)):
            if heads.prev:
                drafted = heads.first_with_confidence(eh[sl, i], final[sl.start - 1:sl.stop - 1], i)[0]
            else:
                drafted = heads.draft_tokens(eh[sl, i], i)
            hits[i] += (drafted == target).sum().item()
        total += target.shape[0]
    return {e: (hits[i].item() / total if total else math.nan) for i, e in enumerate(heads.exit_layers)}


@torch.no_grad()
def draft_outcomes(heads: ExitHeads, sequences: Sequence[tuple[torch.Tensor, int]]):
    """Every exit's greedy draft at every continuation position of ``sequences`` (the model's
    own greedy continuations, teacher-forced): its draft-head probability and whether it equals
    the full model's token there.

    Returns:
        ``(probs, accepted)``: [N, n_exits] float32 and [N, n_exits] bool numpy arrays.
    """
    import numpy as np

    probs, acc = [], []
    for ids, n_prompt in sequences:
        eh, _, _ = teacher_forced(heads.stack, ids, heads.exit_layers)
        sl = slice(max(n_prompt - 1, 0), ids.shape[0] - 1)
        target = ids[sl.start + 1: sl.stop + 1].to(eh.device)
        if target.numel() == 0:
            continue
        cols_p, cols_a = [], []
        for i in range(len(heads.exit_layers)):
            tok, prob = heads.draft_with_confidence(eh[sl, i], i)
            cols_p.append(prob.float().cpu())
            cols_a.append((tok == target).cpu())
        probs.append(torch.stack(cols_p, 1))
        acc.append(torch.stack(cols_a, 1))
    if not probs:
        return np.zeros((0, len(heads.exit_layers)), np.float32), np.zeros((0, len(heads.exit_layers)), bool)
    return torch.cat(probs).numpy(), torch.cat(acc).numpy()


def calibrate_acceptance(heads: ExitHeads, sequences: Sequence[tuple[torch.Tensor, int]]) -> AcceptanceCalibration:
    """Fit ``heads.acceptance`` (and return it): per exit, how often a draft token is accepted
    given its draft-head probability, on ``sequences`` - continuations the heads were NOT fitted
    on (fitted positions would make the calibration overconfident). Used by
    :class:`~lede_env.stopping.CalibratedStop` to end drafts inside a round.

    Raises:
        ValueError: no continuation positions.
    """
    probs, acc = draft_outcomes(heads, sequences)
    heads.acceptance = AcceptanceCalibration.fit(probs, acc)
    return heads.acceptance
