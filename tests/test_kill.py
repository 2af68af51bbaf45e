"""Killed at any moment, nothing is lost or half-written (crash testing in the style of SQLite's).

Each long command (``lede traces build``, ``lede exits fit``, ``lede collect``, ``lede train`` on
the collected dataset) runs on a tiny model as a subprocess and SIGKILLs itself at chosen crash points
(``$LEDE_CRASH_AT``: every publication of a file, folder or Minari dataset has one before and one
after its rename, see :func:`lede_env.model.crash_point`). After each kill:

- every file that a command would later read is whole: JSON parses, safetensors and npz arrays
  load, every Minari dataset listed passes ``lede dataset validate``'s checks;
- the same command run again completes (or, killed after its last publication, refuses to
  overwrite it with a clear message), and its files equal those of an uninterrupted run;
- no temporary (``.NAME.lede-<host>-<pid>-*``) or partial dataset (``partial-*``) is left.

The suite runs a few kill points per command (seeded, printed); ``LEDE_KILL_TEST=full`` runs every
crash point of every command.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

LEDE = [sys.executable, "-c", "from agents.cli import main; main()"]
TINY = ["--model", "{model}", "--max-new-tokens", "8", "--calib-prompts", "humaneval[100:103]", "--head-kind", "affine",
        "--draft-vocab", "64"]
COLLECT = ["collect", *TINY, "--prompts", "humaneval[0:3]", "--episodes", "4", "--cost-profile", "analytic",
           "--dataset-id", "lede/tiny/kill-v0"]
#: name -> (the command, the command run once before it whose files it starts from, or None)
COMMANDS = {
    "traces build": (["traces", "build", *TINY, "--prompts", "humaneval[0:3]"], None),
    "exits fit": (["exits", "fit", "--model", "{model}", "--max-new-tokens", "8", "--calib-prompts",
                   "humaneval[100:103]", "--heldout-prompts", "humaneval[0:2]", "--draft-vocab", "64", "--kinds",
                   "affine,affine-kl", "--kl-steps", "5"], None),
    "collect": (COLLECT, None),
    "train": (["train", "--dataset-id", "lede/tiny/kill-v0", "--algo", "discrete_cql", "--steps", "20",
               "--batch-size", "16", "--eval-prompts", "", "--out", "{root}/run", "--wandb", "disabled"], COLLECT),
}
FULL = os.environ.get("LEDE_KILL_TEST") == "full"
POINTS_PER_COMMAND = 3


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from lede_env.model import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model", num_layers=4)


def _run(args, root: Path, model: Path, crash_at=None, count_file=None):
    env = dict(os.environ, LEDE_CACHE_DIR=str(root / "cache"), MINARI_DATASETS_PATH=str(root / "minari"),
               OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled")
    env.pop("LEDE_CRASH_AT", None)
    if crash_at is not None:
        env["LEDE_CRASH_AT"] = str(crash_at)
    if count_file is not None:
        env["LEDE_CRASH_COUNT"] = str(count_file)
    cmd = LEDE + [a.replace("{model}", str(model)).replace("{root}", str(root)) for a in args]
    return subprocess.run(cmd, env=env, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
                          timeout=600)


#: measurements of the machine (kernel table, compiled kernel, cost profiles): checked whole, not
#: compared with another run's
MEASURED = ("kernels", "profiles")


def _content(root: Path, compare: bool = True) -> dict[str, str]:
    """A digest of every file a command publishes, by path (temporaries excluded), from its
    loaded content: JSON without its volatile keys, arrays by value, anything else by bytes;
    with ``compare``, measurements (:data:`MEASURED`) are loaded but left out of the digest."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if not p.is_file() or any(part.startswith(".") or part.startswith("partial-") for part in rel.parts):
            continue
        if ("kernels" in rel.parts and "build" in str(rel)) or "d3rlpy_logs" in rel.parts:
            continue  # the compiler's and torch's files (their own locking), d3rlpy's timed logs
        if p.suffix == ".json":
            obj = json.loads(p.read_text())  # raises on a half-written file
            blob = json.dumps(_strip_volatile(obj), sort_keys=True).encode()
        elif p.suffix == ".safetensors":
            from safetensors.numpy import load_file

            blob = b"".join(k.encode() + v.tobytes() for k, v in sorted(load_file(str(p)).items()))
        elif p.suffix == ".npz":
            with np.load(p, allow_pickle=False) as z:
                blob = b"".join(k.encode() + z[k].tobytes() for k in sorted(z.files))
        else:
            blob = p.read_bytes()
        if not (compare and any(m in rel.parts for m in MEASURED)):
            out[str(rel)] = hashlib.sha256(blob).hexdigest()
    return out


_VOLATILE = {"seconds", "created", "date", "timestamp", "time", "timings", "minari_version", "data_path", "out_dir",
             "train_seconds"}


def _strip_volatile(obj):
    if isinstance(obj, dict):
        return {k: _strip_volatile(v) for k, v in obj.items() if k not in _VOLATILE}
    if isinstance(obj, list):
        return [_strip_volatile(v) for v in obj]
    return obj


def _check_whole(root: Path) -> None:
    _content(root, compare=False)  # every JSON, safetensors and npz file loads
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
def test_a_killed_command_leaves_nothing_half_written_and_reruns_to_the_same_result(name, tiny_model, tmp_path):
    args, before = COMMANDS[name]
    ref = tmp_path / "ref"  # builds the compiled kernel and its table once (10 s; not under test)
    if before is not None:
        r = _run(before, ref, tiny_model)
        assert r.returncode == 0, r.stderr[-2000:]
        start = tmp_path / "start"  # what the command under test starts from
        shutil.copytree(ref, start)
    r = _run(args, ref, tiny_model)
    assert r.returncode == 0, r.stderr[-2000:]

    def fresh(root: Path) -> Path:
        if before is not None:
            shutil.copytree(start, root)
        else:
            shutil.copytree(ref / "cache" / "kernels", root / "cache" / "kernels")
        return root

    count = tmp_path / "count"
    r = _run(args, fresh(tmp_path / "counted"), tiny_model, count_file=count)  # as the killed runs start
    assert r.returncode == 0, r.stderr[-2000:]
    n_points = int(count.read_text())
    reference = _content(tmp_path / "counted")
    assert n_points >= 2 and reference.keys() == _content(ref).keys()
    seed = int(os.environ.get("LEDE_KILL_SEED", "0"))
    points = list(range(1, n_points + 1)) if FULL else sorted(random.Random(seed).sample(range(1, n_points + 1),
                                                                                          min(POINTS_PER_COMMAND, n_points)))
    print(f"{name}: {n_points} crash points; killing at {points} (LEDE_KILL_SEED={seed})")
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
        assert _content(root) == reference, f"{name}: re-run after crash point {at} differs"
        assert _temporaries(root) == [], f"{name}: left after the re-run of crash point {at}"
        shutil.rmtree(root)
