"""Killed at any moment, nothing is lost or half-written (crash testing in the style of SQLite's).

Each long command (``lede traces build``, ``lede exits fit``, ``lede collect``, ``lede dataset
merge`` of two shards, ``lede train`` with a d3rlpy (``discrete_cql``) and a stable-baselines3
(``ppo``) algorithm, ``lede export``, ``lede evaluate`` of the exported agent, ``lede sweep`` of two
trials) runs on a tiny model as a subprocess, in its own folder, and SIGKILLs itself at chosen crash
points (``$LEDE_CRASH_AT``: every publication of a file, folder or Minari dataset has one before and
one after its rename, see :func:`lede_env.storage.crash_point`). After each kill:

- every file that a command would later read is whole: JSON parses, safetensors and npz arrays
  load, zip archives (sb3's ``model.zip``) pass their CRC check, CSV and Markdown tables have
  rows of the header's width, every Minari dataset listed passes ``lede dataset validate``'s checks,
  every run folder (``train_config.json``) loads as an agent (``lede export`` reads it) and every
  exported policy (``policy.json``) loads (``lede evaluate agent:PATH`` reads it);
- the same command run again completes (or, killed after its last publication, refuses to
  overwrite it with a clear message), and its files equal those of an uninterrupted run;
- no temporary (``.NAME.lede-<host>-<pid>-*``) or partial dataset (``partial-*``) is left.

The suite runs a few kill points per command (seeded by ``$LEDE_KILL_SEED``, printed);
``LEDE_KILL_TEST=full`` runs every crash point of every command. A command's starting files (the
dataset, run or policy it reads) are built once per module by running the commands before it.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

LEDE = [sys.executable, "-c", "from agents.cli import main; main()"]
TINY = ["--model", "{model}", "--max-new-tokens", "8", "--calib-prompts", "humaneval[100:103]", "--head-kind", "affine",
        "--draft-vocab", "64"]
COLLECT = ["collect", *TINY, "--prompts", "humaneval[0:3]", "--episodes", "4", "--cost-profile", "analytic",
           "--dataset-id", "lede/tiny/kill-v0"]
TRAIN = ["train", "--dataset-id", "lede/tiny/kill-v0", "--algo", "discrete_cql", "--steps", "20", "--batch-size", "16",
         "--eval-prompts", "", "--out", "run", "--wandb", "disabled"]
EXPORT = ["export", "--run-dir", "run", "--out", "policy"]
SWEEP_YAML = """method: grid
metric: {name: heldout_throughput, goal: maximize}
parameters:
  algo: {value: discrete_cql}
  learning_rate: {values: [0.001, 0.0003]}
  dataset_id: {value: lede/tiny/kill-v0}
  steps: {value: 20}
  batch_size: {value: 16}
  hidden: {value: [16]}
  eval_prompts: {value: "humaneval[5:7]"}
"""
#: a setup step that writes a file (relative to the command's folder) instead of running lede
WRITE = "write"
#: name -> (the command, the steps run once before it whose files it starts from, kill points in the
#: default subset). Every command runs in its own folder (its working directory), so relative paths
#: (``run``, ``policy``) are the same in every copy and the results can be compared.
COMMANDS = {
    "traces build": (["traces", "build", *TINY, "--prompts", "humaneval[0:3]"], [], 3),
    "exits fit": (["exits", "fit", "--model", "{model}", "--max-new-tokens", "8", "--calib-prompts",
                   "humaneval[100:103]", "--heldout-prompts", "humaneval[0:2]", "--draft-vocab", "64", "--kinds",
                   "affine,affine-kl", "--kl-steps", "5"], [], 3),
    "collect": (COLLECT, [], 3),
    "dataset merge": (["dataset", "merge", "lede/tiny/shards-v0", "--shards", "2"],
                      [COLLECT] + [COLLECT[:-1] + ["lede/tiny/shards-v0", "--shard", f"{k}/2"] for k in (1, 2)], 1),
    "train": (TRAIN, [COLLECT], 2),
    "train sb3": (["train", "--dataset-id", "lede/tiny/kill-v0", "--algo", "ppo", "--steps", "64", "--batch-size",
                   "16", "--eval-prompts", "", "--out", "run-ppo", "--wandb", "disabled"], [COLLECT], 1),
    "export": (EXPORT, [COLLECT, TRAIN], 1),
    "evaluate": (["evaluate", "--policies", "ar,static:best,oracle,agent:policy", *TINY, "--prompts", "humaneval[3:5]",
                  "--train-prompts", "humaneval[0:3]", "--cost-profile", "analytic", "--out", "eval", "--wandb",
                  "disabled"], [COLLECT, TRAIN, EXPORT], 1),
    "sweep": (["sweep", "sweep.yaml", "--out", "sweep", "--wandb", "disabled"],
              [COLLECT, [WRITE, "sweep.yaml", SWEEP_YAML]], 1),
}
FULL = os.environ.get("LEDE_KILL_TEST") == "full"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from lede_env.model import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model", num_layers=4)


@pytest.fixture(scope="module")
def prepared(tiny_model, tmp_path_factory):
    """``get(steps)``: a folder holding what ``steps`` (lede commands, or ``[WRITE, name, text]``)
    leave when run in order, each prefix built once per module; ``get([])`` holds the compiled
    kernel and its table alone (built once, 10 s; not under test: every kill starts with them)."""
    states: dict[str, Path] = {}

    def get(steps: list) -> Path:
        key = json.dumps(steps)
        if key not in states:
            root = tmp_path_factory.mktemp("state")
            if not steps:
                scratch = tmp_path_factory.mktemp("kernels")
                r = _run(["traces", "build", *TINY, "--prompts", "humaneval[0:1]"], scratch, tiny_model)
                assert r.returncode == 0, r.stderr[-2000:]
                shutil.copytree(scratch / "cache" / "kernels", root / "cache" / "kernels")
                shutil.rmtree(scratch)
            else:
                shutil.copytree(get(steps[:-1]), root, dirs_exist_ok=True)
                step = steps[-1]
                if step[0] == WRITE:
                    (root / step[1]).write_text(step[2])
                else:
                    r = _run(step, root, tiny_model)
                    assert r.returncode == 0, f"setup {step[:2]}:\n{r.stdout[-1000:]}{r.stderr[-2000:]}"
            states[key] = root
        return states[key]

    return get


def _run(args, root: Path, model: Path, crash_at=None, count_file=None):
    """Run ``lede ARGS`` in the folder ``root`` (its cache, Minari datasets and relative paths)."""
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, LEDE_CACHE_DIR=str(root / "cache"), MINARI_DATASETS_PATH=str(root / "minari"),
               OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled",
               PYTHONPATH=os.pathsep.join([str(repo), *filter(None, [os.environ.get("PYTHONPATH")])]))
    env.pop("LEDE_CRASH_AT", None)
    if crash_at is not None:
        env["LEDE_CRASH_AT"] = str(crash_at)
    if count_file is not None:
        env["LEDE_CRASH_COUNT"] = str(count_file)
    cmd = LEDE + [a.replace("{model}", str(model)).replace("{root}", str(root)) for a in args]
    return subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=600)


#: measurements of the machine (kernel table, compiled kernel, cost profiles; the real decoder's
#: wall-clock rows of `lede evaluate` and their plot): checked whole, not compared with another run's
MEASURED = ("kernels", "profiles")
MEASURED_FILES = ("live_eval.json", "live_eval.csv", "live_eval.md", "speedup_by_category.png")


def _content(root: Path, compare: bool = True) -> dict[str, str]:
    """A digest of every file a command publishes, by path (temporaries excluded), from its
    loaded content: JSON without its volatile keys, arrays by value, anything else by bytes;
    with ``compare``, measurements (:data:`MEASURED`) are loaded but left out of the digest."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if not p.is_file() or any(part.startswith(".") or part.startswith("partial-") for part in rel.parts):
            continue
        if ("kernels" in rel.parts and "build" in str(rel)) or {"d3rlpy_logs", "sb3_logs"} & set(rel.parts):
            continue  # the compiler's and torch's files (their own locking), d3rlpy's and sb3's timed logs
        if p.suffix == ".json":
            obj = json.loads(p.read_text())  # raises on a half-written file
            blob = json.dumps(_strip_volatile(obj), sort_keys=True).encode()
        elif p.suffix in (".csv", ".md") and p.with_suffix(".json").exists():  # write_results' tables
            blob = _table_blob(p)
        elif p.suffix == ".zip":
            blob = _zip_blob(p)
        elif p.suffix == ".safetensors":
            from safetensors.numpy import load_file

            blob = b"".join(k.encode() + v.tobytes() for k, v in sorted(load_file(str(p)).items()))
        elif p.suffix == ".npz":
            with np.load(p, allow_pickle=False) as z:
                blob = b"".join(k.encode() + z[k].tobytes() for k in sorted(z.files))
        else:
            blob = p.read_bytes()
        if not (compare and (any(m in rel.parts for m in MEASURED) or p.name in MEASURED_FILES)):
            out[str(rel)] = hashlib.sha256(blob).hexdigest()
    return out


_VOLATILE = {"seconds", "created", "date", "timestamp", "time", "timings", "minari_version", "data_path", "out_dir",
             "train_seconds", "policy_seconds"}


def _table_blob(p: Path) -> bytes:
    """The rows of a table that ``agents.evaluate.write_results`` wrote beside its JSON twin
    (``NAME.csv`` / ``NAME.md``), without the volatile columns (e.g. a sweep's ``train_seconds``).
    Each of the three files is published whole on its own: after a kill between two of them, the
    twins may hold different (whole) versions of the table until the re-run.

    Raises:
        AssertionError: a row without the header's number of cells, or no final newline (a
            truncated file).
    """
    text = p.read_text()
    assert text.endswith("\n"), f"{p}: not whole (no final newline)"
    if p.suffix == ".csv":
        lines = list(csv.reader(io.StringIO(text)))
    else:
        lines = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in text.splitlines() if ln.strip()]
        lines = lines[:1] + lines[2:]  # the |---| line
    header, rows = lines[0], lines[1:]
    assert rows and all(len(r) == len(header) for r in rows), f"{p}: not whole (rows of another width)"
    return json.dumps([[kv for kv in zip(header, r) if kv[0] not in _VOLATILE] for r in rows]).encode()


#: entries of sb3's ``data`` (JSON) that differ between identical runs: the start time, the
#: episode-info buffer (wall-clock ``t`` per episode) and pickled classes; the weights
#: (``policy.pth``, the optimizer's) are compared by bytes
_SB3_VOLATILE = {"start_time", "ep_info_buffer", "policy_class", "rollout_buffer_class"}


def _zip_blob(p: Path) -> bytes:
    """The members of a zip archive (sb3's ``model.zip``) by content: zip headers carry the
    writing time. Raises on a truncated archive or a bad CRC."""
    with zipfile.ZipFile(p) as z:
        assert z.testzip() is None, f"{p}: bad CRC"
        parts = []
        for name in sorted(z.namelist()):
            data = z.read(name)
            if name == "data":
                data = json.dumps({k: v for k, v in json.loads(data).items() if k not in _SB3_VOLATILE},
                                  sort_keys=True).encode()
            parts.append(name.encode() + hashlib.sha256(data).digest())
    return b"".join(parts)


def _strip_volatile(obj):
    if isinstance(obj, dict):
        return {k: _strip_volatile(v) for k, v in obj.items() if k not in _VOLATILE}
    if isinstance(obj, list):
        return [_strip_volatile(v) for v in obj]
    return obj


def _check_whole(root: Path) -> None:
    _content(root, compare=False)  # every JSON, safetensors, npz, zip file and table loads
    for cfg in root.rglob("train_config.json"):  # every run folder listed is an agent `lede export` loads
        if not any(part.startswith(".") for part in cfg.relative_to(root).parts):
            from agents.train import load_algo

            assert load_algo(cfg.parent) is not None
    for cfg in root.rglob("policy.json"):  # every exported policy loads (`lede evaluate agent:PATH`)
        if not any(part.startswith(".") for part in cfg.relative_to(root).parts):
            from lede_env.policies import ExportedPolicy

            ExportedPolicy(cfg.parent)
    minari_root = root / "minari"
    if minari_root.exists():
        from agents.datasets_tool import validate

        old = os.environ.get("MINARI_DATASETS_PATH")
        os.environ["MINARI_DATASETS_PATH"] = str(minari_root)
        try:
            for meta in minari_root.rglob("metadata.json"):
                ds_dir = meta.parent.parent
                if not ds_dir.name.startswith("partial-"):
                    assert validate(str(ds_dir.relative_to(minari_root)), replay=False) == []
        finally:  # the other tests' Minari folder (conftest) comes back
            if old is None:
                os.environ.pop("MINARI_DATASETS_PATH", None)
            else:
                os.environ["MINARI_DATASETS_PATH"] = old


def _temporaries(root: Path) -> list[str]:
    return [str(p.relative_to(root)) for p in root.rglob("*") if ".lede-" in p.name or p.name.startswith("partial-")]


@pytest.mark.parametrize("name", list(COMMANDS))
def test_a_killed_command_leaves_nothing_half_written_and_reruns_to_the_same_result(name, tiny_model, prepared,
                                                                                      tmp_path):
    args, setup, default_points = COMMANDS[name]
    start = prepared(setup)  # what the command under test starts from (with the compiled kernel)

    def fresh(root: Path) -> Path:
        shutil.copytree(start, root)
        return root

    count = tmp_path / "count"
    r = _run(args, fresh(tmp_path / "counted"), tiny_model, count_file=count)  # as the killed runs start
    assert r.returncode == 0, r.stderr[-2000:]
    n_points = int(count.read_text())
    reference = _content(tmp_path / "counted")
    assert n_points >= 2
    seed = int(os.environ.get("LEDE_KILL_SEED", "0"))
    points = list(range(1, n_points + 1)) if FULL else sorted(random.Random(seed).sample(range(1, n_points + 1),
                                                                                          min(default_points, n_points)))
    print(f"{name}: {n_points} crash points; killing at {points} (LEDE_KILL_SEED={seed} replays this choice; "
          f"LEDE_KILL_TEST=full kills at every point)")
    for at in points:
        root = fresh(tmp_path / f"kill-{at}")
        r = _run(args, root, tiny_model, crash_at=at)
        assert r.returncode == -signal.SIGKILL, f"{name} at crash point {at}: exit {r.returncode}\n{r.stderr[-2000:]}"
        _check_whole(root)
        published = _content(root) == reference  # killed after its last publication: the work is whole
        r = _run(args, root, tiny_model)
        if published and r.returncode != 0:  # a command may refuse to overwrite what it published, clearly
            assert "already exists" in r.stdout + r.stderr, f"{name} re-run after crash point {at}:\n{r.stdout}"
        else:
            assert r.returncode == 0, f"{name} re-run after crash point {at}:\n{r.stdout[-1000:]}{r.stderr[-2000:]}"
        got = _content(root)
        assert got == reference, (f"{name}: re-run after crash point {at} differs in "
                                  f"{sorted(k for k in got.keys() | reference.keys() if got.get(k) != reference.get(k))}")
        assert _temporaries(root) == [], f"{name}: left after the re-run of crash point {at}"
        shutil.rmtree(root)
