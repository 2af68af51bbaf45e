"""LayerStack, the adapter to transformers internals: its fast kernels agree with the default
ones and are restored after decoding, even on error."""

from __future__ import annotations

import pytest
import torch

from lede_env.decoding import SelfSpeculativeDecoder, StaticPolicy
from lede_env.exits import ExitHeads
from lede_env.kernels import available
from lede_env.layers import LayerStack

from ..conftest import make_tiny


def test_kernels_are_restored_even_on_error():
    b = make_tiny()
    stack = LayerStack(b.model, kernels="onednn") if b.stack.kernels == "onednn" else b.stack
    linears = [m for m in stack.layers.modules() if isinstance(m, torch.nn.Linear)]
    heads = ExitHeads(stack, (1, 2, 3))
    dec = SelfSpeculativeDecoder(stack, heads, 4, b.eos_ids)

    class Boom(StaticPolicy):
        def act(self, obs):
            raise RuntimeError("policy failed")

    with pytest.raises(RuntimeError, match="policy failed"):
        dec.generate(torch.tensor([5, 6, 7]), Boom(0), 8)
    assert all("forward" not in m.__dict__ for m in linears)  # no patched forward left behind


def test_fast_kernels_agree_with_default():
    b = make_tiny()
    kernels = [k for k in available(b.stack.device, b.stack.dtype) if k != "default"]
    if not kernels:
        pytest.skip("no fp32 CPU kernels besides torch's on this machine")
    ref = LayerStack(b.model, kernels="default")
    g = torch.Generator().manual_seed(0)
    for d_in in (64, 70):  # a multiple of the skinny kernel's 32-float step, and one with a tail
        w, bias = torch.randn(32, d_in, generator=g), torch.randn(32, generator=g)
        for k in kernels:
            fast = LayerStack(b.model, kernels=k)
            for rows in range(1, 18):  # both sides of every kernel's row limit (5 blas, 8 skinny, 16 packed)
                x = torch.randn(1, rows, d_in, generator=g)
                for bb in (None, bias):
                    y = fast.linear(x, w, bb)
                    assert y.shape == (1, rows, 32)
                    torch.testing.assert_close(y, ref.linear(x, w, bb), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="kernels"):
        LayerStack(b.model, kernels="cuda-magic")


def test_buffered_cache_equals_transformers_dynamic_cache():
    """The stack's KV cache (a buffer that grows by doubling, cropped by moving its length)
    gives the same outputs as transformers' DynamicCache through prefill, growth past the
    first buffer, multi-position passes and crops."""
    from transformers import DynamicCache

    from lede_env.layers import BufferedLayer

    b = make_tiny()
    st = b.stack
    ours, ref = st.new_cache(), DynamicCache(config=b.model.config)
    assert all(isinstance(layer, BufferedLayer) for layer in ours.layers)
    g = torch.Generator().manual_seed(0)
    pos = 0
    with torch.no_grad():
        for q, keep in [(200, 200), (1, 201), (5, 203), (3, 203), (90, 290), (4, 291), (1, 292)]:
            x = st.embed(torch.randint(0, b.model.config.vocab_size, (1, q), generator=g))
            outs = [st.run(x, 0, st.num_layers, c, pos) for c in (ours, ref)]
            assert torch.equal(outs[0], outs[1])
            for c in (ours, ref):
                st.crop(c, keep)
            assert {st.cache_length(ours, i) for i in range(st.num_layers)} == {keep}
            assert torch.equal(ours.layers[0].keys, ref.layers[0].keys)
            pos = keep


def test_linear_on_zero_rows_gives_an_empty_result():
    """No rows (e.g. head statistics of no exit) -> [0, out] with every kernel choice."""
    b = make_tiny()
    w = torch.randn(8, 64)
    for k in available(b.stack.device, b.stack.dtype):
        stack = LayerStack(b.model, kernels=k)
        assert stack.linear(torch.zeros(0, 64), w).shape == (0, 8)
