"""Device and dtype selection (``lede --device/--dtype``), dtype-keyed caches, LayerSkip cards,
the transformers ``assistant_early_exit`` baseline. (CUDA itself is exercised by
benchmarks/gpu_check.sh on a GPU machine; here CUDA is unavailable and must be refused clearly.)"""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from lede_env.device import dtype_tag, resolve_device, resolve_dtype, synchronize
from lede_env.model import layerskip_card, save_tiny_model


@pytest.fixture
def no_env(monkeypatch):
    for k in ("LEDE_DEVICE", "LEDE_DTYPE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    return monkeypatch


def test_defaults_are_cpu_fp32(no_env):
    assert resolve_device(None) == torch.device("cpu")
    assert resolve_dtype(None) == torch.float32
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")


def test_environment_and_spellings(no_env):
    no_env.setenv("LEDE_DTYPE", "bf16")
    assert resolve_dtype(None) == torch.bfloat16
    for name, dt in (("fp32", torch.float32), ("bfloat16", torch.bfloat16), ("FP16", torch.float16)):
        assert resolve_dtype(name) == dt
    assert dtype_tag(torch.bfloat16) == "bf16" and dtype_tag(torch.float32) == "fp32"
    synchronize(torch.device("cpu"))  # a no-op on CPU


def test_non_fp32_dtype_is_recorded_in_env_specs(no_env):
    from agents.pipeline import DemoConfig
    from lede_env.device import spec_dtype

    assert spec_dtype() == {} and DemoConfig().task_for("humaneval[0:2]").model.dtype is None
    no_env.setenv("LEDE_DTYPE", "bf16")
    assert spec_dtype() == {"dtype": "bf16"} and DemoConfig().task_for("humaneval[0:2]").model.dtype == "bf16"


def test_bad_device_and_dtype_name_the_fix(no_env):
    with pytest.raises(ValueError, match="use one of fp32"):
        resolve_dtype("int8")
    with pytest.raises(ValueError, match="cpu, cuda"):
        resolve_device("tpu-ish")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available.*--device cpu"):
            resolve_device("cuda")
        no_env.setenv("LOCAL_RANK", "1")
        with pytest.raises(ValueError, match="cuda:1"):  # a torchrun rank gets its own GPU
            resolve_device("cuda")


def test_cli_global_options(no_env):
    from agents.cli import app

    r = CliRunner().invoke(app, ["--dtype", "int8", "tiny-model", "/nonexistent/x"])
    assert r.exit_code == 2 and "Unknown dtype" in r.output
    if not torch.cuda.is_available():
        r = CliRunner().invoke(app, ["--device", "cuda", "tiny-model", "/nonexistent/x"])
        assert r.exit_code == 2 and "CUDA is not available" in r.output


def test_layerskip_cards():
    assert layerskip_card("facebook/layerskip-llama2-7B")["exit_layer"] == 8
    assert layerskip_card("/models/layerskip-llama2-7B/")["speculation_length"] == 6  # a local copy
    assert layerskip_card("facebook/layerskip-llama3.2-1B")["exit_layer"] == 4
    assert layerskip_card("meta-llama/Llama-3.2-1B") is None and layerskip_card(None) is None


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("m") / "tiny", num_layers=4)


def test_bf16_traces_are_cached_apart_from_fp32(tiny_folder, tmp_path, no_env):
    """The dtype changes greedy continuations, so it is part of every cache key and manifest."""
    from lede_env.env import LEDEEnv

    no_env.setenv("LEDE_CACHE_DIR", str(tmp_path / "cache"))
    kw = dict(model=str(tiny_folder), prompts="humaneval[0:2]", max_new_tokens=8, exit_layers=[1, 2], k_max=2,
              head_kind="lens", draft_vocab=None, feature_vocab=49152, cost_profile="analytic", progress=False)
    e32 = LEDEEnv(**kw)
    e16 = LEDEEnv(**kw, dtype="bf16")
    assert e32.manifest["model"]["dtype"] == "fp32" and e16.manifest["model"]["dtype"] == "bf16"
    slugs = sorted(p.name for p in (tmp_path / "cache" / "traces").iterdir())
    assert len(slugs) == 2 and slugs[1] == slugs[0] + "@bf16"
    obs, _ = e16.reset(seed=0)
    obs, r, *_ = e16.step(e16.actions.encode(2, 2))
    assert obs["hidden"].dtype.name == "float32" and r == r  # finite observations and rewards from bf16


def test_hf_early_exit_names():
    from agents.evaluate import hf_early_exit, is_transformers_baseline

    assert hf_early_exit("hf-early-exit:4", 16) == 4 and hf_early_exit("hf", 16) is None
    assert is_transformers_baseline("hf-early-exit:4") and is_transformers_baseline("hf")
    assert not is_transformers_baseline("static:4,2")
    for bad in ("hf-early-exit:16", "hf-early-exit:0", "hf-early-exit:x"):
        with pytest.raises(ValueError, match="integer in 1..15"):
            hf_early_exit(bad, 16)


def test_assistant_early_exit_is_lossless_in_live_eval(tiny):
    """transformers' own self-speculative decoding timed beside lede's loop: same tokens as AR."""
    from agents.evaluate import live_eval
    from lede_env.decoding import SelfSpeculativeDecoder
    from lede_env.env import LEDEEnv

    b, heads, ts, prof = tiny
    env = LEDEEnv.with_objects(trace_set=ts, profile=prof, eos_ids=b.eos_ids, k_max=4, max_new_tokens=12)
    env.playable = env.playable[:2]
    dec = SelfSpeculativeDecoder(b.stack, heads, 4, b.eos_ids, profile=prof)
    rows = live_eval(env, dec, ["ar", "hf-early-exit:2", "static:2,2"], progress=False, by_category=False)
    by = {r["policy"]: r for r in rows}
    assert by["transformers assistant_early_exit=2"]["identical_to_ar"]
    assert by["static:2,2"]["identical_to_ar"] and by["ar"]["speedup_vs_ar"] == 1.0
