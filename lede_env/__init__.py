"""lede: dynamic self-speculative decoding of Llama-family LLMs as a reinforcement-learning problem.

Importing this package registers the Gymnasium environments:

- ``LEDE-Llama3-v0`` - the trace-backed MDP (:class:`lede_env.trace_env.TraceEnv`).
- ``LEDE-Llama3-Live-v0`` - the same MDP on the real model (:class:`lede_env.live_env.LiveEnv`):
  sampling (``temperature``, ``top_p``) and wall-clock costs (``cost="wallclock"``).

Both build on :class:`lede_env.env.LEDEEnv`; ``LEDEEnv(backend="trace"|"live", ...)`` makes either.
"""

__version__ = "0.1.0"

from gymnasium.envs.registration import register, registry

from .decoding import GenerationResult, RoundRecord, SelfSpeculativeDecoder, StaticPolicy
from .env import LEDEEnv
from .generate import Lede, LedeOutput, generate
from .live_env import LiveEnv
from .mdp import ActionMap
from .model import load_model
from .trace_env import TraceEnv

if "LEDE-Llama3-v0" not in registry:
    register(id="LEDE-Llama3-v0", entry_point="lede_env.trace_env:TraceEnv")
if "LEDE-Llama3-Live-v0" not in registry:
    register(id="LEDE-Llama3-Live-v0", entry_point="lede_env.live_env:LiveEnv", nondeterministic=True)

__all__ = ["ActionMap", "GenerationResult", "LEDEEnv", "Lede", "LedeOutput", "LiveEnv", "RoundRecord",
           "SelfSpeculativeDecoder", "StaticPolicy", "TraceEnv", "generate", "load_model", "__version__"]
