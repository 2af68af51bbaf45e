"""Ship what makes the registered task ``LEDE-Llama3-v1`` the same MDP on every machine.

- its traces: the embedded model's greedy continuations of the training and held-out prompts
  with every exit's teacher-forced drafts (``lede_env/data/traces/``, without hidden states,
  which only the ``"full"`` observation reads), so no machine replays drafts that a kernel or a
  near-tie changed, and the first ``reset`` builds nothing;
- its cost profile: fitted to rounds timed in the decoding loop on this machine, the reference
  machine (``lede_env/data/profiles/``, ``cost_profile="reference"``), with where, how and when it
  was measured in its ``meta``;
- the best-static search on each of those trace sets (the relative reward's lambda), which takes
  seconds a time.

    python scripts/ship_task_data.py --threads 1    # reuse the cached in-loop profile, or measure it

Inputs: the embedded SmolLM2-135M-Instruct, its shipped exit heads, the prompts of
``lede_env.prompts.DEFAULT_TRAIN`` and ``DEFAULT_EVAL``. Run it on an otherwise idle machine: the
profile is timed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time

import torch

from lede_env.calibration import get_heads
from lede_env.config import studied_task
from lede_env.costs import PACKAGED_PROFILES, profile_path, profile_positions, reference_key
from lede_env.env import LEDEEnv, head_spec
from lede_env.loop_profile import get_profile
from lede_env.model import get_bundle
from lede_env.prompts import DEFAULT_EVAL, DEFAULT_TRAIN, load_prompts
from lede_env.storage import record_packaged_file, write_text_atomic
from lede_env.task import observation_config
from lede_env.trace_env import PACKAGED_STATIC, static_search_key
from lede_env.traces import PACKAGED_TRACES, TraceSpec, get_traces, trace_key, write_trace_file
from lede_env.version import __version__


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1, help="torch threads the profile is timed with")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    task = studied_task()
    bundle = get_bundle(None)
    heads = get_heads(bundle, head_spec(task))
    obs = observation_config(task.to_kwargs())
    positions = profile_positions(task.rules.k_max, task.rules.context_lengths, task.rules.context_draft)

    cached = profile_path(bundle, heads, positions, obs, "measured")
    measured_at = (datetime.datetime.fromtimestamp(cached.stat().st_mtime, datetime.timezone.utc) if cached.exists()
                   else datetime.datetime.now(datetime.timezone.utc))
    prof = get_profile("measured", bundle, heads, positions, obs)
    prof.source = "reference"
    prof.meta.update(reference_machine={"cpu": cpu_name(), "cores": os.cpu_count(), "threads": args.threads,
                                        "torch": torch.__version__, "lede": __version__,
                                        "measured": measured_at.strftime("%Y-%m-%d %H:%M UTC"),
                                        "command": "python scripts/ship_task_data.py "
                                                   f"--threads {args.threads} (lede_env.loop_profile)"})
    key = reference_key(bundle, heads, positions, obs)
    path = PACKAGED_PROFILES / (key.replace("/", "-") + ".json")
    write_text_atomic(path, json.dumps(prof.to_json(), indent=1, sort_keys=True))
    record_packaged_file(path, key, task="LEDE-Llama3-v1", made_by="scripts/ship_task_data.py")
    print(f"reference profile {path}: AR step {prof.ar_step * 1e3:.2f} ms on {cpu_name()}, {args.threads} thread(s)")

    for spec in (DEFAULT_TRAIN, DEFAULT_EVAL):
        ts = get_traces(TraceSpec(None, spec, task.max_new_tokens, head_spec(task)), bundle=bundle, heads=heads)
        key = trace_key(bundle, load_prompts(spec), task.max_new_tokens, heads)
        path = PACKAGED_TRACES / (key.replace("/", "-") + ".safetensors")
        write_trace_file(ts, path)
        record_packaged_file(path, key, prompts=spec, traces=len(ts), tokens=sum(t.n for t in ts.traces),
                             made_by="scripts/ship_task_data.py")
        print(f"traces {path}: {len(ts)} prompts, {path.stat().st_size / 1e3:.0f} kB")
    # the best-static search of each shipped trace set (lambda of the relative reward, static:best)
    found = {}
    for spec in (DEFAULT_TRAIN, DEFAULT_EVAL):
        env = LEDEEnv(task.replace(prompts=spec), progress=False)
        found[static_search_key(*env.static_setting(), env.max_new_tokens)] = list(env.best_static())
        print(f"best static on {spec}: action {env.best_static()[0]}, throughput {env.best_static()[1]:.4f}")
    write_text_atomic(PACKAGED_STATIC, json.dumps(found, indent=1, sort_keys=True))
    print(f"done in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
