"""The one adapter to transformers' internals: :class:`LayerStack`.

Every call that depends on the transformers version (a decoder layer's ``cache=`` keyword,
how a cache layer is cropped, the rotary-embedding call, the 4-D attention mask) lives here.
Tested with transformers 5.24; the range is pinned in ``pyproject.toml``.
"""

from __future__ import annotations

import functools
import os
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import torch

from .kernels import KERNELS
from .kernels import linear as _kernel_linear
from . import kernels as K


#: ``config.model_type`` values whose decoder layers follow Llama's interface
#: (pre-norm layers taking ``position_embeddings`` and ``cache``, a final ``norm``, an ``lm_head``).
LLAMA_FAMILY = ("llama", "mistral", "qwen2", "qwen3")


def attention_windows(config) -> tuple[Optional[int], ...]:
    """Each decoder layer's sliding attention window, in positions (``None``: full causal
    attention), as transformers reads ``config``: a layer whose ``layer_types`` entry is
    ``"sliding_attention"`` (Qwen2/Qwen3 with ``use_sliding_window``) or, for configs without
    ``layer_types`` (Mistral), every layer where ``sliding_window`` is set. A position ``i``
    attends to the keys ``j`` with ``i - window < j <= i`` (transformers'
    ``masking_utils.sliding_window_overlay``).
    """
    n = config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    if not window:
        return (None,) * n
    types = getattr(config, "layer_types", None)
    if types is None:
        return (int(window),) * n
    return tuple(int(window) if t == "sliding_attention" else None for t in types[:n])


def check_llama_family(config) -> None:
    """Raise ``ValueError`` unless ``config`` describes a Llama-family decoder-only model."""
    mt = getattr(config, "model_type", None)
    if mt not in LLAMA_FAMILY:
        raise ValueError(
            f"Model type {mt!r} is not Llama-family; lede supports {', '.join(LLAMA_FAMILY)} "
            "(decoder layers with rotary position embeddings, a final norm and an LM head)."
        )


@dataclass
class LayerStack:
    """Runs slices of a Llama-family model's layers against one shared KV cache.

    This is the only place that touches transformers internals; everything else calls
    :meth:`embed`, :meth:`run`, :meth:`norm`, :meth:`lm_head`, :meth:`new_cache` and
    :meth:`crop`.

    Attributes:
        model: a ``LlamaForCausalLM``-like model (``model.model.layers``, ``model.model.norm``,
            ``model.lm_head``, ``model.model.rotary_emb``).
        kernels: matrix-product kernels of the decoder and LM head (:mod:`lede_env.kernels`):
            ``"auto"`` (default) uses, for each number of rows (positions), the kernel measured
            fastest on this machine for this model's weights (:func:`lede_env.kernels.kernel_table`,
            measured once and cached); or one named kernel for every call: ``"blas"``,
            ``"skinny"``, ``"onednn"``, ``"default"``. Off the fp32 CPU every choice is
            ``"default"``. Kernels agree to fp32 rounding (about 1e-6 relative), so greedy tokens
            can differ between them only on exact near-ties; every part of lede uses the same
            stack, hence the same kernels.
        kernel_table: after construction, ``kernel_table[r-1]`` is the kernel used for ``r``
            rows (r = 1..:data:`~lede_env.kernels.TABLE_ROWS`; more rows use oneDNN).
    """

    model: torch.nn.Module
    kernels: str = "auto"

    def __post_init__(self) -> None:
        check_llama_family(self.model.config)
        inner = self.model.model
        self.layers = inner.layers[: self.model.config.num_hidden_layers]
        self.num_layers = len(self.layers)
        self.hidden_size = self.model.config.hidden_size
        self._embed = inner.embed_tokens
        self._norm = inner.norm
        self._rotary = inner.rotary_emb
        self._head = self.model.lm_head
        #: each layer's sliding attention window in positions (``None``: full attention)
        self.windows = attention_windows(self.model.config)
        self.device = next(self.model.parameters()).device
        self.dtype = next(self.model.parameters()).dtype
        self.set_kernels(self.kernels)

    def set_kernels(self, kernels: str) -> None:
        """Choose the matrix-product kernels (see the class docstring); ``"auto"`` reads
        ``$LEDE_KERNELS`` first (e.g. ``LEDE_KERNELS=blas`` to compare with BLAS alone).

        Raises:
            ValueError: an unknown kernel name (in the argument or ``$LEDE_KERNELS``).
        """
        if kernels == "auto":
            kernels = os.environ.get("LEDE_KERNELS", "auto") or "auto"
        if kernels not in KERNELS + ("auto",):
            raise ValueError(f"kernels={kernels!r}; choose 'auto' or one of {KERNELS} (argument or $LEDE_KERNELS).")
        self.kernels = kernels
        avail = K.available(self.device, self.dtype)
        if kernels == "auto":
            weights = [m.weight for m in self.layers.modules() if isinstance(m, torch.nn.Linear)]
            self.kernel_table = K.kernel_table(weights + [self._head.weight], self.device, self.dtype)
        else:
            if kernels not in avail:
                print(f"lede: kernel {kernels!r} is not available for {self.dtype} on {self.device}; "
                      f"using {avail[0]!r}.", file=sys.stderr)
            self.kernel_table = (kernels if kernels in avail else avail[0],) * K.TABLE_ROWS
        self._large = avail[0]  # oneDNN where present

    @property
    def kernels_tag(self) -> str:
        """The kernel per row count, e.g. ``"blas,blas,skinny,...|onednn"`` (cache keys, profile meta)."""
        return ",".join(self.kernel_table) + "|" + self._large

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``x @ weight.T + bias`` with this stack's kernel for the number of rows.
        [..., in] x [out, in] -> [..., out]."""
        rows = x.numel() // x.shape[-1]
        kernel = self.kernel_table[rows - 1] if 1 <= rows <= len(self.kernel_table) else self._large
        return _kernel_linear(kernel, x, weight, bias)

    @contextmanager
    def kernels_active(self):
        """Within this block the decoder layers' linear layers use :attr:`kernel_table`, and on the
        CPU attention over several new positions runs grouped-query attention on the cached
        key/value heads as they are (transformers' ``TRANSFORMERS_SDPA_FORCE_GQA``; with a causal
        mask it would otherwise copy every cached key and value for each query head; measured in
        ``docs/experiments.md``; identical outputs). Both are restored after, even on error (the model
        is shared with callers, e.g. transformers' ``generate``).

        Thread-safe: the linear layers are patched once per model while any block on it is open
        in any thread (reference-counted under a lock; the last block to close restores them),
        and a patched layer runs the kernels of the stack whose block is open in the calling
        thread, or the layer's own forward in a thread that has none open (transformers'
        ``generate`` on the same model, or a second stack with other kernels, is unaffected).
        The attention setting is process-wide: it stays set while any block is open.
        """
        patch = set(self.kernel_table) != {"default"}
        key = id(self.model)
        active = _active_stacks()
        active.setdefault(key, []).append(self)
        try:
            _acquire(self, key, patch, self.device.type == "cpu")
            try:
                yield
            finally:
                _release(key, patch, self.device.type == "cpu")
        finally:
            active[key].pop()
            if not active[key]:
                del active[key]

    def new_cache(self):
        """An empty KV cache with one croppable layer per decoder layer: :class:`BufferedLayer`
        (:func:`buffered_layer_class`: keys and values written into a buffer that grows by doubling, instead of transformers'
        ``DynamicLayer``, which copies the whole cache at every forward pass). Sliding-window
        layers keep every position too (the window is applied by :meth:`causal_mask`), so that
        rejected drafts can be cropped off: transformers' ``DynamicSlidingWindowLayer`` drops
        the positions that leave the window and cannot be cropped back."""
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        layer_cls = buffered_layer_class()
        cache.layers = [layer_cls() for _ in cache.layers]
        return cache

    @staticmethod
    def cache_length(cache, layer: int = 0) -> int:
        """Number of cached positions of decoder layer ``layer`` (0-based)."""
        return cache.layers[layer].get_seq_length() if layer < len(cache.layers) else 0

    def crop(self, cache, length: int) -> None:
        """Trim every layer's cache to its first ``length`` positions (layers may differ in length)."""
        for layer in cache.layers:
            n = layer.get_seq_length()
            if n > length:
                layer.crop(length - n)  # transformers 5.x: a negative count of positions to drop

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings. ``input_ids`` [1, q] int64 -> [1, q, d] float."""
        return self._embed(input_ids)

    def positions(self, hidden: torch.Tensor, start: int):
        """Rotary (cos, sin) for positions ``start .. start+q-1`` of ``hidden`` [1, q, d]."""
        q = hidden.shape[1]
        pos = torch.arange(start, start + q, device=hidden.device).unsqueeze(0)
        return pos, self._rotary(hidden, position_ids=pos)

    @staticmethod
    def causal_mask(q: int, start: int, device, window: Optional[int] = None) -> Optional[torch.Tensor]:
        """Boolean mask [1, 1, q, start+q] (True = attend) for q new positions after ``start``
        cached ones, within a sliding ``window`` of positions where one is given (see
        :func:`attention_windows`); ``None`` where every position may attend to every cached one
        (q == 1 inside the window)."""
        kv = start + q
        if q == 1 and (window is None or kv <= window):
            return None
        i = torch.arange(q, device=device).unsqueeze(1) + start
        j = torch.arange(kv, device=device).unsqueeze(0)
        allowed = j <= i
        if window is not None:
            allowed &= j > i - window
        return allowed.view(1, 1, q, kv)

    def tree_inputs(self, hidden: torch.Tensor, start: int, local: torch.Tensor, position_ids: torch.Tensor):
        """Rotary embeddings and attention masks of q new positions that are not a causal run (a
        token tree, SpecInfer arXiv 2305.09781): for :meth:`run`'s ``rope`` and ``masks``.

        Args:
            hidden: [1, q, d] the new positions' inputs (only their shape, dtype and device are read).
            start: cached positions before them (each attends to all of them, within a window).
            local: [q, q] bool, ``local[i, j]``: new position i attends to new position j (a tree:
                j is i or one of its ancestors).
            position_ids: [q] int64 position id of each new position (a tree: root + depth).

        Returns:
            ``(rope, masks)``: ``(position_ids [1, q], (cos, sin))`` and, per sliding window of the
            layers (``None``: full attention), the [1, 1, q, start + q] bool mask; a layer's window
            drops the keys whose position is ``window`` or more below the query's.

        Raises:
            ValueError: ``local`` or ``position_ids`` not of q rows.
        """
        q, dev = hidden.shape[1], hidden.device
        if tuple(local.shape) != (q, q) or tuple(position_ids.shape) != (q,):
            raise ValueError(f"tree_inputs: local {tuple(local.shape)} and position_ids {tuple(position_ids.shape)} "
                             f"must be ({q}, {q}) and ({q},) for {q} new positions.")
        pos = position_ids.to(dev).view(1, q)
        rope = (pos, self._rotary(hidden, position_ids=pos))
        allowed = torch.cat([torch.ones(q, start, dtype=torch.bool, device=dev), local.to(dev)], 1)  # [q, start+q]
        key_pos = torch.cat([torch.arange(start, device=dev), pos[0]])
        masks = {}
        for w in set(self.windows):
            m = allowed if w is None else allowed & (key_pos.unsqueeze(0) > pos[0].unsqueeze(1) - w)
            masks[w] = m.view(1, 1, q, start + q)
        return rope, masks

    def compact(self, cache, start: int, keep) -> None:
        """Keep, of the positions after the first ``start`` of every layer's cache, the ones at
        offsets ``keep`` (in that order, moved to ``start .. start + len(keep) - 1``), and drop the
        rest: the KV cache of a verified token tree reduced to its accepted branch. Offsets
        ``0 .. m-1`` in order are a plain :meth:`crop` (no copy).

        Args:
            cache: the KV cache (:meth:`new_cache`); every layer must hold more than
                ``start + max(keep)`` positions.
            start: positions kept as they are.
            keep: offsets (ints, increasing) after ``start`` of the positions to keep.

        Raises:
            ValueError: offsets that are not increasing, negative, or past a layer's cache.
        """
        keep = [int(k) for k in keep]
        if any(k < 0 for k in keep) or any(b <= a for a, b in zip(keep, keep[1:])):
            raise ValueError(f"compact: keep={keep} must be increasing non-negative offsets.")
        m = len(keep)
        fixed = next((j for j, k in enumerate(keep) if k != j), m)  # offsets already in place
        if fixed == m:
            self.crop(cache, start + m)
            return
        short = min(layer.get_seq_length() for layer in cache.layers)
        if start + keep[-1] >= short:
            raise ValueError(f"compact: offset {keep[-1]} after {start} is past a layer's {short} cached positions.")
        start, keep = start + fixed, [k - fixed for k in keep[fixed:]]  # gather only the rows that move
        for layer in cache.layers:
            idx = torch.tensor(keep, device=layer.keys.device) + start
            if getattr(layer, "_kbuf", None) is not None:  # BufferedLayer: gather inside the buffer
                layer._kbuf[..., start:start + len(keep), :] = layer._kbuf[..., idx, :]  # (the gather copies first)
                layer._vbuf[..., start:start + len(keep), :] = layer._vbuf[..., idx, :]
                layer._n = start + len(keep)
                layer._views()
            else:  # transformers' DynamicLayer
                layer.keys = torch.cat([layer.keys[..., :start, :], layer.keys[..., idx, :]], -2)
                layer.values = torch.cat([layer.values[..., :start, :], layer.values[..., idx, :]], -2)

    def run(self, hidden: torch.Tensor, first: int, last: int, cache, start: int, rope=None,
            masks: Optional[dict] = None) -> torch.Tensor:
        """Run decoder layers ``first+1 .. last`` (1-based, inclusive) on ``hidden``.

        Args:
            hidden: [1, q, d] input to layer ``first+1`` (the output of layer ``first``; the
                embeddings when ``first == 0``).
            first, last: 0 <= first <= last <= L.
            cache: the shared KV cache; each of these layers must hold exactly ``start``
                positions, and gains ``q``.
            start: position index of ``hidden[:, 0]``.
            rope: ``(position_ids, (cos, sin))`` from :meth:`positions`, to reuse across calls.
            masks: sliding window -> [1, 1, q, start + q] bool attention mask (from
                :meth:`tree_inputs`, with its ``rope``); ``None``: causal (:meth:`causal_mask`).

        Returns:
            [1, q, d] output of layer ``last``.
        """
        if first == last:
            return hidden
        pos, pe = rope if rope is not None else self.positions(hidden, start)
        if masks is None:
            masks = {w: self.causal_mask(hidden.shape[1], start, hidden.device, w) for w in set(self.windows[first:last])}
        for layer, w in zip(self.layers[first:last], self.windows[first:last]):
            hidden = layer(hidden, attention_mask=masks[w], position_ids=pos, position_embeddings=pe,
                           cache=cache, use_cache=True)
        return hidden

    def norm(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final RMSNorm. [..., d] -> [..., d]."""
        return self._norm(hidden)

    def lm_head(self, normed: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits. [..., d] -> [..., V]."""
        return self._head(normed)

    def head_logits(self, normed: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits with this stack's kernels. [q, d] -> [q, V]."""
        return self.linear(normed, self._head.weight, getattr(self._head, "bias", None))

    def greedy_tokens(self, normed: torch.Tensor) -> torch.Tensor:
        """Argmax of the full LM head. [q, d] -> [q] int64 (ties go to the lowest id)."""
        return self.head_logits(normed).argmax(-1)

    @property
    def head_weight(self) -> torch.Tensor:
        """LM head weight [V, d]."""
        return self._head.weight


# ---- the kernel patch of a model's linear layers, shared by every stack and thread on it ------
#: guards _PATCHES and _GQA_STATE
_PATCH_LOCK = threading.Lock()
#: id(model) -> [open blocks, [(linear layer, its own instance forward or None), ...]]
_PATCHES: dict = {}
#: [open blocks on the CPU, whether lede set the attention variable itself]
_GQA_STATE = [0, False]
_GQA_KEY = "TRANSFORMERS_SDPA_FORCE_GQA"
_LOCAL = threading.local()
_NONE: dict = {}


def _active_stacks() -> dict:
    """This thread's open :meth:`LayerStack.kernels_active` blocks: id(model) -> stacks, innermost last."""
    stacks = getattr(_LOCAL, "stacks", None)
    if stacks is None:
        stacks = _LOCAL.stacks = {}
    return stacks


def _dispatching_forward(module: torch.nn.Linear, key: int, own):
    """The patched ``forward`` of a linear layer: the kernels of the calling thread's open stack
    on the model, else the layer's own forward."""
    base = own if own is not None else functools.partial(type(module).forward, module)
    weight, bias = module.weight, module.bias  # read once (a Module attribute lookup costs ~0.5 us a call)

    def forward(x: torch.Tensor) -> torch.Tensor:
        mine = getattr(_LOCAL, "stacks", _NONE).get(key)
        if not mine:
            return base(x)
        return mine[-1].linear(x, weight, bias)

    return forward


def _acquire(stack: "LayerStack", key: int, patch: bool, cpu: bool) -> None:
    """Open a kernels block: patch the model's linear layers if no block on it is open yet, and
    set the attention variable if no block is open anywhere (and the user has not set it)."""
    with _PATCH_LOCK:
        if cpu:
            if _GQA_STATE[0] == 0:
                _GQA_STATE[1] = _GQA_KEY not in os.environ
                if _GQA_STATE[1]:
                    os.environ[_GQA_KEY] = "1"
            _GQA_STATE[0] += 1
        if patch:
            entry = _PATCHES.get(key)
            if entry is None:
                saved = []
                for m in stack.layers.modules():
                    if isinstance(m, torch.nn.Linear):
                        own = vars(m).get("forward")
                        m.forward = _dispatching_forward(m, key, own)
                        saved.append((m, own))
                entry = _PATCHES[key] = [0, saved]
            entry[0] += 1


def _release(key: int, patch: bool, cpu: bool) -> None:
    """Close a kernels block: the last one on a model restores its linear layers, the last one
    anywhere the attention variable."""
    with _PATCH_LOCK:
        if patch:
            entry = _PATCHES[key]
            entry[0] -= 1
            if entry[0] == 0:
                for m, own in entry[1]:
                    if own is not None:
                        m.forward = own
                    else:
                        vars(m).pop("forward", None)
                del _PATCHES[key]
        if cpu:
            _GQA_STATE[0] -= 1
            if _GQA_STATE[0] == 0 and _GQA_STATE[1]:
                os.environ.pop(_GQA_KEY, None)
                _GQA_STATE[1] = False


class _BufferedKV:
    """The methods of :class:`BufferedLayer`: a mixin over transformers' ``DynamicLayer``, which
    :func:`buffered_layer_class` subclasses at first use (``super()`` here is ``DynamicLayer``'s)."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._n = 0
        self._kbuf = self._vbuf = None

    def _reserve(self, need: int, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        cap = 0 if self._kbuf is None else self._kbuf.shape[-2]
        if need <= cap:
            return
        cap = max(need, 2 * cap, 256)
        kb = key_states.new_empty(key_states.shape[:-2] + (cap, key_states.shape[-1]))
        vb = value_states.new_empty(value_states.shape[:-2] + (cap, value_states.shape[-1]))
        if self._n:
            kb[..., : self._n, :] = self._kbuf[..., : self._n, :]
            vb[..., : self._n, :] = self._vbuf[..., : self._n, :]
        self._kbuf, self._vbuf = kb, vb

    def _views(self) -> None:
        self.keys = self._kbuf[..., : self._n, :]
        self.values = self._vbuf[..., : self._n, :]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append key_states / value_states [b, h, q, d]; return the cached keys and values
        [b, h, n + q, d] (views of the buffer)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        q = key_states.shape[-2]
        self._reserve(self._n + q, key_states, value_states)
        self._kbuf[..., self._n: self._n + q, :] = key_states
        self._vbuf[..., self._n: self._n + q, :] = value_states
        self._n += q
        self._views()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self._n if self.is_initialized else 0

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` positions (transformers 5.x: a negative count)."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop({tokens_to_remove}): pass a negative count of positions to drop.")
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        self._n = max(0, self._n + tokens_to_remove)
        self._views()

    def reset(self) -> None:
        self._n = 0
        self._kbuf = self._vbuf = None
        super().reset()

    def _rebuild(self) -> None:
        """After an operation that replaced keys/values (batch changes): buffer them again."""
        k, v = self.keys, self.values
        self._n, self._kbuf, self._vbuf = 0, None, None
        if k is not None and k.numel():
            self.update(k, v)

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._rebuild()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._rebuild()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._rebuild()


@functools.lru_cache(maxsize=1)
def buffered_layer_class():
    """The :class:`BufferedLayer` class (it subclasses transformers' ``DynamicLayer``, so it is
    made at first use rather than when lede is imported)."""
    from transformers.cache_utils import DynamicLayer

    class BufferedLayer(_BufferedKV, DynamicLayer):
        """A KV-cache layer whose keys and values live in a buffer [b, h, capacity, d] that grows
        by doubling; :attr:`keys` / :attr:`values` are views of its first
        :meth:`get_seq_length` positions.

        transformers' ``DynamicLayer`` concatenates the new positions to the whole cache at every
        forward pass: each decoding round copied every cached key and value of every layer (a
        large share of a verify pass at long contexts, ``docs/experiments.md``). Here a pass
        writes only its q new positions; cropping (rejected drafts) only
        moves the length back. Results are identical: attention reads the same values.
        """

    return BufferedLayer


def __getattr__(name: str):
    if name == "BufferedLayer":
        return buffered_layer_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
