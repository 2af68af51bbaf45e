"""benchmarks/gpu_check.sh runs end to end on a CPU with a tiny model (its own test), so that on
a GPU machine the check is one command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_end_to_end_on_cpu(tmp_path):
    from lede_env.model import save_tiny_model

    tiny = save_tiny_model(tmp_path / "tiny", num_layers=8)
    bindir = Path(sys.executable).parent
    env = dict(os.environ, DEVICE="cpu", MODEL=str(tiny), QUICK="1", OUT=str(tmp_path / "out"),
               LEDE_CACHE_DIR=str(tmp_path / "cache"), LEDE=str(bindir / "lede"), PY=sys.executable,
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.pop("LEDE_DEVICE", None)
    env.pop("LEDE_DTYPE", None)
    p = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], env=env, capture_output=True, text=True,
                       timeout=900)
    assert p.returncode == 0, p.stderr[-4000:]
    res = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert res["facts"]["device"] == "cpu" and res["facts"]["dtype"] == "float32"
    pols = [r["policy"] for r in res["wall_clock"]]
    # AR, transformers generate, best static, transformers' assistant_early_exit at L/4 = 2 (not a
    # LayerSkip checkpoint), the agent, the oracle
    assert pols[0] == "ar" and "hf" in pols and "transformers assistant_early_exit=2" in pols
    assert any(p.startswith("static best") for p in pols) and "oracle" in pols
    assert "LEDE agent (discrete_cql)" in pols
    ar = res["wall_clock"][0]
    assert ar["speedup_vs_ar"] == 1.0 and ar["tokens_per_s"] > 0
    # fp32 on CPU: every method's output is greedy AR's, and the teacher-forced check agrees
    assert all(r["identical_to_ar"] for r in res["wall_clock"])
    eq = res["greedy_equivalence"]
    assert set(eq) >= {"ar", "oracle", "LEDE agent (discrete_cql)"}
    for e in eq.values():
        assert e["ok"] and e["violations"] == 0 and e["generations"] == 2 and e["positions"] > 0
    assert set(res["stages"]) == {"traces_train", "traces_eval", "collect", "train", "export", "evaluate"}
    assert res["prompts"] == {"eval": "humaneval[24:26]", "train": "humaneval[0:4]", "max_new_tokens": 16}


def test_gpu_check_fails_fast_when_the_model_is_missing(tmp_path):
    env = dict(os.environ, DEVICE="cpu", MODEL=str(tmp_path / "no-such-model"), OUT=str(tmp_path / "out"),
               LEDE=str(Path(sys.executable).parent / "lede"), PY=sys.executable)
    p = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode != 0 and "is not on this machine" in p.stderr and "hf download" in p.stderr
    assert not (tmp_path / "out" / "timings.jsonl").exists()  # no stage ran
