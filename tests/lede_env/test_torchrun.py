"""``--shard auto``: trace building split over the processes of torchrun (or any launcher that
sets RANK and WORLD_SIZE), end to end on a tiny random Llama on the CPU.

The ranks share nothing but the lede cache folder: each decodes its part of the greedy
continuations into it, and a final unsharded ``lede traces build`` reuses them all.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lede_env.sharding import launcher_local_rank, launcher_shard, parse_shard

BIN = Path(sys.executable).parent
TRACE_PROMPTS, CALIB_PROMPTS = 6, 4  # humaneval[0:6], humaneval[100:104]
ARGS = ["traces", "build", "--prompts", "humaneval[0:6]", "--calib-prompts", "humaneval[100:104]",
        "--max-new-tokens", "16", "--head-kind", "lens"]
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
                 "MASTER_PORT", "TORCHELASTIC_RUN_ID")


# ---- parse_shard("auto") ----------------------------------------------------------------------
def _launcher_env(monkeypatch, **env):
    for k in LAUNCHER_VARS:
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)


def test_parse_shard_auto_reads_rank_and_world_size(monkeypatch):
    _launcher_env(monkeypatch, RANK="0", WORLD_SIZE="2", LOCAL_RANK="0")
    assert parse_shard("auto") == (1, 2)
    _launcher_env(monkeypatch, RANK="7", WORLD_SIZE="8")
    assert parse_shard(" AUTO ") == (8, 8)
    _launcher_env(monkeypatch, RANK="0", WORLD_SIZE="1")
    assert parse_shard("auto") == (1, 1)
    assert parse_shard("3/4") == (3, 4) and parse_shard(None) is None  # K/N ignores the launcher


def test_parse_shard_auto_without_launcher_names_the_fix(monkeypatch):
    _launcher_env(monkeypatch)
    with pytest.raises(ValueError, match=r"--shard auto needs torchrun/accelerate launch \(RANK and WORLD_SIZE\); "
                                         r"give K/N instead"):
        parse_shard("auto")
    _launcher_env(monkeypatch, RANK="0")  # half a launcher environment
    with pytest.raises(ValueError, match="WORLD_SIZE not set"):
        parse_shard("auto")


@pytest.mark.parametrize("rank, world, match", [("x", "2", "RANK='x' is not an integer"),
                                                ("0", "two", "WORLD_SIZE='two' is not an integer"),
                                                ("2", "2", "0 <= RANK < WORLD_SIZE"),
                                                ("-1", "2", "0 <= RANK < WORLD_SIZE"),
                                                ("0", "0", "WORLD_SIZE >= 1")])
def test_parse_shard_auto_malformed(monkeypatch, rank, world, match):
    _launcher_env(monkeypatch, RANK=rank, WORLD_SIZE=world)
    with pytest.raises(ValueError, match=match):
        parse_shard("auto")


def test_launcher_local_rank(monkeypatch):
    _launcher_env(monkeypatch)
    assert launcher_local_rank() is None
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert launcher_local_rank() == 3
    assert launcher_local_rank({"LOCAL_RANK": "1"}) == 1 and launcher_local_rank({}) is None
    assert launcher_shard({"RANK": "4", "WORLD_SIZE": "16"}) == (5, 16)
    for bad in ("-1", "gpu0"):
        monkeypatch.setenv("LOCAL_RANK", bad)
        with pytest.raises(ValueError, match="LOCAL_RANK"):
            launcher_local_rank()


def test_cli_shard_auto_without_launcher_is_a_usage_error(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from agents.cli import app

    _launcher_env(monkeypatch)
    monkeypatch.setenv("LEDE_CACHE_DIR", str(tmp_path))
    r = CliRunner().invoke(app, ["traces", "build", "--shard", "auto", "--model", str(tmp_path / "none")])
    assert r.exit_code == 2 and "RANK and WORLD_SIZE" in r.output
    assert not any(tmp_path.iterdir())  # nothing loaded or written


# ---- end to end: two ranks, then the unsharded build ---------------------------------------
@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from lede_env.model import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("model") / "tiny", num_layers=4)


def _env(cache: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    return env | {"LEDE_CACHE_DIR": str(cache), "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
                  "COLUMNS": "300"} | extra


def _lede(cache: Path, args: list, **extra) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "lede"), *args], env=_env(cache, **extra), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _finish(p: subprocess.Popen) -> str:
    out, _ = p.communicate(timeout=180)
    assert p.returncode == 0, out[-4000:]
    return out


def _continuations(cache: Path) -> dict[Path, float]:
    return {f: f.stat().st_mtime_ns for f in (cache / "continuations").rglob("*.json")}


def _traces(cache: Path):
    from lede_env.traces import load_traces

    (manifest,) = (cache / "traces").rglob("manifest.json")  # exactly one trace set
    return load_traces(manifest.parent)


def _check_shards_then_unsharded(cache: Path, out: str, tiny_folder: Path, reference) -> None:
    """Both ranks together decoded every prompt exactly once; the unsharded build decodes
    nothing and gives the reference traces."""
    built = [tuple(map(int, m)) for m in re.findall(r"(\d+) trace-prompt and (\d+) calibration", out)]
    assert len(built) == 2, out[-4000:]
    assert sum(b[0] for b in built) == TRACE_PROMPTS and sum(b[1] for b in built) == CALIB_PROMPTS
    before = _continuations(cache)
    # each rank decoded its count into the empty cache and there are that many distinct files:
    # no prompt was decoded by both ranks (or twice by one)
    assert len(before) == TRACE_PROMPTS + CALIB_PROMPTS
    assert not (cache / "traces").exists()  # shards build continuations only
    _finish(_lede(cache, [*ARGS, "--model", str(tiny_folder)]))
    assert _continuations(cache) == before  # no new or rewritten continuation: nothing decoded again
    ts, ref = _traces(cache), reference
    assert [t.id for t in ts.traces] == [t.id for t in ref.traces] and len(ts) == TRACE_PROMPTS
    for a, b in zip(ts.traces, ref.traces):
        np.testing.assert_array_equal(a.generated, b.generated)
        np.testing.assert_array_equal(a.draft, b.draft)


@pytest.fixture(scope="module")
def reference(tiny_folder, tmp_path_factory):
    """An unsharded build from an empty cache."""
    cache = tmp_path_factory.mktemp("cache-unsharded")
    _finish(_lede(cache, [*ARGS, "--model", str(tiny_folder)]))
    assert len(_continuations(cache)) == TRACE_PROMPTS + CALIB_PROMPTS
    return _traces(cache)


def test_shard_auto_two_processes_with_rank_env(tiny_folder, reference, tmp_path):
    """What any launcher does: the same command twice, with RANK 0 and 1 of WORLD_SIZE 2."""
    cache = tmp_path / "cache"
    procs = [_lede(cache, [*ARGS, "--shard", "auto", "--model", str(tiny_folder)], RANK=str(r), WORLD_SIZE="2",
                   LOCAL_RANK=str(r)) for r in range(2)]
    outs = [_finish(p) for p in procs]
    assert "shard" in outs[0] and "shard" in outs[1]
    _check_shards_then_unsharded(cache, "\n".join(outs), tiny_folder, reference)


def test_torchrun_shard_auto(tiny_folder, reference, tmp_path):
    """torchrun --standalone --nproc-per-node 2 --no-python lede traces build --shard auto."""
    torchrun = BIN / "torchrun"
    if not torchrun.exists():
        pytest.skip(f"no torchrun next to {sys.executable}")
    cache = tmp_path / "cache"
    p = subprocess.Popen([str(torchrun), "--standalone", "--nproc-per-node", "2", "--no-python", str(BIN / "lede"),
                          *ARGS, "--shard", "auto", "--model", str(tiny_folder)],
                         env=_env(cache), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _check_shards_then_unsharded(cache, _finish(p), tiny_folder, reference)


# ---- lede collect --shard auto --------------------------------------------------------------
def test_collect_shard_auto_is_resolved_when_configured(monkeypatch):
    """``--shard auto`` is fixed to K/N when the collection config is made, so the dataset id
    (``...-shard<K>of<N>-v<V>``, what ``lede dataset merge ID --shards N`` looks for) names the
    launcher's shard whatever happens to the environment later (``collect`` itself is tested
    with K/N shards in tests/agents/test_datasets.py)."""
    from agents.collect import CollectConfig
    from agents.store import shard_dataset_id

    _launcher_env(monkeypatch, RANK="1", WORLD_SIZE="2", LOCAL_RANK="1")
    cfg = CollectConfig(dataset_id="lede/tiny/auto-mixed-v0", episodes=3, seed=1, shard="auto")
    assert cfg.shard == "2/2"
    _launcher_env(monkeypatch)
    assert shard_dataset_id(cfg.dataset_id, *parse_shard(cfg.shard)) == "lede/tiny/auto-mixed-shard2of2-v0"
    with pytest.raises(ValueError, match="RANK and WORLD_SIZE"):
        CollectConfig(episodes=3, shard="auto")
    _launcher_env(monkeypatch, RANK="2", WORLD_SIZE="4")
    with pytest.raises(ValueError, match="empty"):  # rank 3 of 4 has no episode of 2
        CollectConfig(episodes=2, shard="auto")
