"""Exporting a trained policy as a standalone artefact (no d3rlpy needed to run it).

An export folder holds exactly:

- ``policy.pt`` - TorchScript greedy policy from d3rlpy's ``save_policy`` (observation
  standardisation included): input [batch, flat_dim] float32, output [batch] int64 action.
- ``policy.json`` - ``format``, ``exit_layers``, ``k_max``, ``bonus``, ``observation``
  (:class:`~lede_env.mdp.ObservationConfig` fields), ``observation_layout`` (keys and shapes
  concatenated into the flat input), ``model`` (name and shape), ``heads`` (kind, vocabulary
  sizes and fingerprint of the exit heads the policy was trained with), ``algo``,
  ``reward_mode``, ``gamma``.

:class:`agents.policies.ExportedPolicy` loads it.
"""

from __future__ import annotations

import json
from pathlib import Path

from lede_env.model import atomic_folder

EXPORT_FORMAT = 1


def export_policy(algo, env, out_dir: str | Path, algo_name: str = "", gamma: float | None = None) -> Path:
    """Write ``policy.pt`` + ``policy.json`` for ``algo`` trained on ``env``'s observations.

    The folder is written under a temporary name and renamed when complete.

    Args:
        algo: a trained d3rlpy Q-learning algorithm.
        env: the ``LEDE-Llama3-v0`` env (its exits, k_max, observation layout are recorded).
        out_dir: destination folder (replaced if it exists).

    Returns:
        ``out_dir`` as a Path.
    """
    u = env.unwrapped
    out = Path(out_dir)
    with atomic_folder(out) as tmp:
        algo.save_policy(str(tmp / "policy.pt"))
        man = u.trace_set.manifest
        cfg = {
            "format": EXPORT_FORMAT,
            "exit_layers": list(u.actions.exit_layers),
            "k_max": u.actions.k_max,
            "bonus": u.rules.bonus,
            "observation": {"hidden_dim": u.obs_config.hidden_dim, "history": u.obs_config.history,
                            "recent_tokens": u.obs_config.recent_tokens, "seed": u.obs_config.seed},
            "observation_layout": u.observer.layout(),
            "model": man["model"],
            "heads": man["heads"],
            "algo": algo_name,
            "reward_mode": u.reward_mode,
            "gamma": gamma,
        }
        (tmp / "policy.json").write_text(json.dumps(cfg, indent=2))
    return out
