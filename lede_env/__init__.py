"""lede: dynamic self-speculative decoding of Llama-family LLMs as a reinforcement-learning problem.

Importing this package registers the Gymnasium environments:

- ``LEDE-Llama3-v0`` - the trace-backed MDP (:class:`lede_env.trace_env.TraceEnv`).
- ``LEDE-Llama3-Live-v0`` - the same MDP on the real model (:class:`lede_env.live_env.LiveEnv`):
  sampling (``temperature``, ``top_p``) and wall-clock costs (``cost="wallclock"``).
- ``LEDE-Llama3-v1`` - the benchmark task lede studies (:func:`lede_env.config.studied_task`:
  multi-domain prompts, exit drafts and context copies with the datastore, the compact
  observation, the calibrated stop rule, relative reward, shipped traces and reference costs, so
  it is the same MDP on every machine); ``LEDE-Llama3-Live-v1`` its live twin. The task card is
  ``docs/benchmark.md``. ``gym.make_vec("LEDE-Llama3-v1", num_envs=N)`` gives the native vector
  env (:class:`lede_env.vector_env.TraceVectorEnv`).

Both build on :class:`lede_env.env.LEDEEnv`; ``LEDEEnv(backend="trace"|"live", ...)`` makes either.
"""

from .version import __version__

import os

import torch
from gymnasium.envs.registration import register, registry

from .config import STUDIED_SETTINGS, TaskConfig, studied_task
from .decoding import GenerationResult, RoundRecord, SelfSpeculativeDecoder, StaticPolicy
from .env import LEDEEnv
from .generate import Lede, LedeOutput, generate
from .live_env import LiveEnv
from .mdp import ActionMap
from .model import load_model
from .trace_env import TraceEnv



def _one_thread_after_fork() -> None:
    """A forked child runs torch on one thread: the OpenMP thread pool of a parent that already
    ran torch ops does not survive ``fork``, and the child's first parallel op waited forever
    (``gym.make_vec(..., vectorization_mode="async")`` with the default start method;
    Gymnasium #222, PR #810). One thread per env process is also what N envs on N cores want."""
    torch.set_num_threads(1)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_one_thread_after_fork)

if "LEDE-Llama3-v0" not in registry:
    register(id="LEDE-Llama3-v0", entry_point="lede_env.trace_env:TraceEnv")
if "LEDE-Llama3-Live-v0" not in registry:
    register(id="LEDE-Llama3-Live-v0", entry_point="lede_env.live_env:LiveEnv", nondeterministic=True)
# the task lede studies (its card: docs/benchmark.md): a new version, never
# a change of v0, whose settings datasets and papers name
if "LEDE-Llama3-v1" not in registry:
    register(id="LEDE-Llama3-v1", entry_point="lede_env.trace_env:TraceEnv", kwargs=dict(STUDIED_SETTINGS),
             vector_entry_point="lede_env.vector_env:make_vector_env")
if "LEDE-Llama3-Live-v1" not in registry:
    register(id="LEDE-Llama3-Live-v1", entry_point="lede_env.live_env:LiveEnv", kwargs=dict(STUDIED_SETTINGS),
             nondeterministic=True)

__all__ = ["ActionMap", "GenerationResult", "LEDEEnv", "STUDIED_SETTINGS", "TaskConfig", "studied_task", "Lede",
           "LedeOutput", "LiveEnv", "RoundRecord",
           "SelfSpeculativeDecoder", "StaticPolicy", "TraceEnv", "generate", "load_model", "__version__"]
