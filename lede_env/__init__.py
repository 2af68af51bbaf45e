"""lede: dynamic self-speculative decoding of Llama-family LLMs as a reinforcement-learning problem.

Importing this package registers the Gymnasium environments:

- ``LEDE-Llama3-v0`` - the trace-backed MDP (:class:`lede_env.trace_env.TraceEnv`).
- ``LEDE-Llama3-Live-v0`` - the same MDP on the real model (:class:`lede_env.live_env.LiveEnv`):
  sampling (``temperature``, ``top_p``) and wall-clock costs (``cost="wallclock"``).

Both build on :class:`lede_env.env.LEDEEnv`; ``LEDEEnv(backend="trace"|"live", ...)`` makes either.
"""

from .version import __version__

import os

import torch
from gymnasium.envs.registration import register, registry

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

__all__ = ["ActionMap", "GenerationResult", "LEDEEnv", "Lede", "LedeOutput", "LiveEnv", "RoundRecord",
           "SelfSpeculativeDecoder", "StaticPolicy", "TraceEnv", "generate", "load_model", "__version__"]
