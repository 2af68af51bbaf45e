"""Model adapter: kernels are restored after decoding (even on error), atomic folders."""

from __future__ import annotations

import pytest
import torch

from lede_env.decoding import SelfSpeculativeDecoder, StaticPolicy
from lede_env.exits import ExitHeads
from lede_env.kernels import available
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
    kernels = [k for k in available(b.stack.device, b.stack.dtype) if k != "default"]
    if not kernels:
        pytest.skip("no fp32 CPU kernels besides torch's on this machine")
    ref = LayerStack(b.model, kernels="default")
    g = torch.Generator().manual_seed(0)
    for d_in in (64, 70):  # a multiple of the skinny kernel's 32-float step, and one with a tail
        w, bias = torch.randn(32, d_in, generator=g), torch.randn(32, generator=g)
        for k in kernels:
            fast = LayerStack(b.model, kernels=k)
            for rows in range(1, 11):  # both sides of every kernel's row limit (5 blas, 8 skinny)
                x = torch.randn(1, rows, d_in, generator=g)
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


def _hammer(path, value, n):
    from lede_env.model import write_json_atomic

    for i in range(n):
        write_json_atomic(path, {"writer": value, "i": i, "pad": "x" * 20_000})


def test_concurrent_writers_leave_one_whole_file(tmp_path):
    """Two processes rewriting the same cache file: every read sees a whole JSON from one of them."""
    import json
    import multiprocessing as mp

    path = tmp_path / "cache.json"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_hammer, args=(path, w, 150)) for w in ("a", "b")]
    for p in procs:
        p.start()
    reads = 0
    while any(p.is_alive() for p in procs):
        if path.exists():
            d = json.loads(path.read_text())  # never a mix or a truncated file
            assert d["writer"] in ("a", "b") and len(d["pad"]) == 20_000
            reads += 1
    for p in procs:
        p.join()
        assert p.exitcode == 0
    assert json.loads(path.read_text())["i"] == 149
    assert [f.name for f in tmp_path.iterdir()] == ["cache.json"]  # no temporary files left


def test_full_disk_gives_an_error_and_leaves_nothing(tmp_path, monkeypatch):
    import errno
    import json

    from lede_env.model import write_json_atomic

    path = tmp_path / "x.json"
    write_json_atomic(path, {"old": True})

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(json, "dump", full)
    with pytest.raises(OSError, match="No space left"):
        write_json_atomic(path, {"new": True})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"old": True}  # the previous whole file is kept
    assert [f.name for f in tmp_path.iterdir()] == ["x.json"]
