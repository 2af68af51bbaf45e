"""Model adapter: kernels are restored after decoding (even on error), atomic folders."""

from __future__ import annotations

import pytest
import torch

from lede_env.decoding import SelfSpeculativeDecoder, StaticPolicy
from lede_env.exits import ExitHeads
from lede_env.model import LayerStack, atomic_folder

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
    if b.stack.kernels == "default":
        pytest.skip("no oneDNN on this machine")
    kernels = ["onednn"] + (["blas"] if torch.backends.mkl.is_available() else [])
    ref = LayerStack(b.model, kernels="default")
    g = torch.Generator().manual_seed(0)
    w, bias = torch.randn(32, 64, generator=g), torch.randn(32, generator=g)
    for k in kernels:
        fast = LayerStack(b.model, kernels=k)
        for rows in range(1, 10):  # both sides of the blas kernels' 6-row switch
            x = torch.randn(1, rows, 64, generator=g)
            for bb in (None, bias):
                y = fast.linear(x, w, bb)
                assert y.shape == (1, rows, 32)
                torch.testing.assert_close(y, ref.linear(x, w, bb), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="kernels"):
        LayerStack(b.model, kernels="cuda-magic")


def test_atomic_folder(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        with atomic_folder(target) as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise KeyboardInterrupt
    assert not target.exists() and list(tmp_path.iterdir()) == []
    with atomic_folder(target) as tmp:
        (tmp / "whole.bin").write_bytes(b"y")
    assert (target / "whole.bin").read_bytes() == b"y"
    with atomic_folder(target, replace=False) as tmp:
        (tmp / "other.bin").write_bytes(b"z")
    assert sorted(p.name for p in target.iterdir()) == ["whole.bin"]
