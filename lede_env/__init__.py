"""lede: dynamic self-speculative decoding of Llama-family LLMs as a reinforcement-learning problem.

Importing this package registers the Gymnasium environments:

- ``LEDE-Llama3-v0`` - the trace-backed MDP (:class:`lede_env.env.LEDEEnv`).
- ``LEDE-Llama3-Live-v0`` - the same MDP on the real model (``backend="live"``): sampling
  (``temperature``, ``top_p``) and wall-clock costs (``cost="wallclock"``).
"""

__version__ = "0.1.0"

from gymnasium.envs.registration import register, registry

from .decoding import GenerationResult, RoundRecord, SelfSpeculativeDecoder, StaticPolicy
from .env import LEDEEnv
from .generate import Lede, LedeOutput, generate
from .mdp import ActionMap
from .model import load_model

if "LEDE-Llama3-v0" not in registry:
    register(id="LEDE-Llama3-v0", entry_point="lede_env.env:LEDEEnv")
if "LEDE-Llama3-Live-v0" not in registry:
    register(id="LEDE-Llama3-Live-v0", entry_point="lede_env.env:LEDEEnv", kwargs={"backend": "live"},
             nondeterministic=True)

__all__ = ["ActionMap", "GenerationResult", "LEDEEnv", "Lede", "LedeOutput", "RoundRecord", "SelfSpeculativeDecoder",
           "StaticPolicy", "generate", "load_model", "__version__"]
