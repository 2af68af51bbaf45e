"""Kernel choice: measured per row count, cached, keyed into cost profiles; a kernel that cannot
be built is skipped with a notice and the output does not change."""

from __future__ import annotations

import json

import pytest
import torch

from lede_env import kernels as K
from lede_env.layers import LayerStack

from ..conftest import make_tiny


def _weights(b):
    return [m.weight for m in b.stack.layers.modules() if isinstance(m, torch.nn.Linear)] + [b.stack.head_weight]


def test_measure_table_picks_the_fastest_kernel_that_handles_the_rows(monkeypatch):
    """With fake clocks (each kernel's time per call fixed), the table names, for each row
    count, the fastest kernel whose row limit allows it."""
    speed = {"blas": 1.0, "skinny": 2.0, "onednn": 3.0}  # seconds per call
    clock = {"t": 0.0}
    monkeypatch.setattr(K, "linear", lambda kernel, x, w, bias=None: clock.__setitem__("t", clock["t"] + speed[kernel]))
    monkeypatch.setattr(K.time, "perf_counter", lambda: clock["t"])
    table, times = K.measure_table([torch.zeros(4, 8)] * 3, ["onednn", "blas", "skinny"], rows_max=9, repeats=2)
    assert table == ("blas",) * 5 + ("skinny",) * 3 + ("onednn",)
    assert times["blas"][0] == 3.0 and times["onednn"][8] == 9.0  # 3 weight matrices per pass


def test_kernel_table_is_measured_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("LEDE_CACHE_DIR", str(tmp_path))
    calls = []
    real = K.measure_table
    monkeypatch.setattr(K, "measure_table", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    b = make_tiny()  # its stack measures the table (kernels="auto")
    if K.available(b.stack.device, b.stack.dtype) == ("default",):
        pytest.skip("no fp32 CPU kernels besides torch's")
    t1 = K.kernel_table(_weights(b), b.stack.device, b.stack.dtype)
    t2 = K.kernel_table(_weights(b), b.stack.device, b.stack.dtype)
    assert t1 == t2 and len(t1) == K.TABLE_ROWS and len(calls) == 1
    files = list((tmp_path / "kernels").glob("table-*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["table"] == list(t1)
    # other weight shapes (another model) get their own measurement
    K.kernel_table([torch.randn(16, 32)], b.stack.device, b.stack.dtype)
    assert len(calls) == 2


def test_a_kernel_that_cannot_be_built_is_skipped_with_a_notice(monkeypatch, capsys, tmp_path):
    broken = tmp_path / "broken.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(K, "_SOURCE", broken)
    monkeypatch.setenv("LEDE_CACHE_DIR", str(tmp_path))
    assert K.skinny_op.__wrapped__() is None
    err = capsys.readouterr().err
    assert "'skinny' CPU kernel could not be built" in err and len(err.strip().splitlines()) == 1
    # the stack then uses another kernel, and says so
    monkeypatch.setattr(K, "skinny_op", lambda: None)
    b = make_tiny()
    stack = LayerStack(b.model, kernels="skinny")
    assert "skinny" not in stack.kernel_table and "not available" in capsys.readouterr().err
    assert "skinny" not in K.available(b.stack.device, b.stack.dtype)


def test_lede_kernels_environment_variable(monkeypatch):
    b = make_tiny()
    monkeypatch.setenv("LEDE_KERNELS", "default")
    assert LayerStack(b.model).kernel_table == ("default",) * K.TABLE_ROWS
    monkeypatch.setenv("LEDE_KERNELS", "fastest-please")
    with pytest.raises(ValueError, match="LEDE_KERNELS"):
        LayerStack(b.model)


def test_the_kernel_table_is_in_the_cost_profile_key(tmp_path, monkeypatch):
    from lede_env.costs import profile_path
    from lede_env.exits import ExitHeads
    from lede_env.mdp import ObservationConfig

    monkeypatch.setenv("LEDE_CACHE_DIR", str(tmp_path))
    b = make_tiny()
    heads = ExitHeads(b.stack, (1, 2))
    paths = set()
    for kernel in ("default", "onednn"):
        b.stack.set_kernels(kernel)
        paths.add(profile_path(b, heads, 4, ObservationConfig()))
    b.stack.set_kernels("auto")
    assert len(paths) == (1 if K.available(b.stack.device, b.stack.dtype) == ("default",) else 2)


def test_attention_runs_grouped_query_heads_inside_the_block_only():
    b = make_tiny()
    import os

    assert "TRANSFORMERS_SDPA_FORCE_GQA" not in os.environ
    with b.stack.kernels_active():
        assert os.environ.get("TRANSFORMERS_SDPA_FORCE_GQA") == "1"
    assert "TRANSFORMERS_SDPA_FORCE_GQA" not in os.environ


def test_packed_copy_follows_the_weight_and_is_dropped_when_not_picked(monkeypatch, tmp_path):
    """The "packed" kernel's weight copy is remade after an in-place change of the weight (a
    stale copy would give the old weight's products), and freed when the measured table does not
    pick the kernel."""
    if "packed" not in K.available(torch.device("cpu"), torch.float32):
        pytest.skip("the packed kernel cannot be built here")
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(8, 32, generator=g), torch.randn(3, 32, generator=g)
    torch.testing.assert_close(K.linear("packed", x, w), x @ w.T, rtol=1e-5, atol=1e-5)
    first = K.packed_weight(w)
    assert K.packed_weight(w) is first  # made once
    with torch.no_grad():
        w.mul_(2.0)
    torch.testing.assert_close(K.linear("packed", x, w), x @ w.T, rtol=1e-5, atol=1e-5)
    assert K.packed_weight(w) is not first
    assert not K.packable(torch.randn(6, 32)) and not K.packable(torch.randn(8, 30))
    # a table without "packed" frees the copies made while measuring it
    monkeypatch.setenv("LEDE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(K, "measure_table", lambda ws, cands: (("skinny",) * K.TABLE_ROWS, {}))
    K.kernel_table([w], torch.device("cpu"), torch.float32)
    assert getattr(w, "_lede_packed", None) is None
