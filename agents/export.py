"""Exporting a trained policy as a standalone artefact (no d3rlpy or stable-baselines3 needed to run it).

An export folder holds exactly:

- ``policy.pt`` - TorchScript greedy policy from the agent's ``save_policy`` (d3rlpy's, or
  :meth:`agents.sb3.SB3Agent.save_policy`; observation standardisation included): input [batch, flat_dim] float32, output [batch] int64 action.
- ``policy.onnx`` (with ``onnx=True``, needs the ``onnx`` extra) - the same graph in ONNX
  (input ``obs`` [batch, flat_dim] float32, output ``action`` [batch] int64), runnable with
  onnxruntime (``ExportedPolicy(path, runtime="onnxruntime")``).
- ``policy.json`` - ``env``: every task setting of the env it was trained in
  (:func:`lede_env.task.env_settings`: the ``LEDEEnv`` keyword arguments that fix its observation,
  actions, rules and costs), from which every command that plays it builds its env or decoder
  (:func:`lede_env.task.settings_for`); then, as before it existed, ``format``, ``exit_layers``, ``k_max``, ``bonus``, ``context_draft`` and
  ``context_ngram`` (what action 0 copies from the context), ``context_datastore`` (fingerprint of
  the datastore context drafts fall back to where the context has no match, or null),
  ``context_lengths`` (the context
  actions), ``tree_budgets`` (the tree actions), ``fallback_action`` (what ``agent:PATH``'s safety net plays when the agent loses: the
  best static action on the training traces), ``observation``
  (:class:`~lede_env.mdp.ObservationConfig` fields), ``stop_rule`` (the in-round stop rule it
  was trained with, e.g. ``{"kind": "calibrated", "lambda": 1.1}``; the decoder rebuilds it from
  the exit heads' acceptance calibration and its cost profile), ``reward_lambda``, ``observation_layout`` (keys and shapes
  concatenated into the flat input), ``model`` (name and shape), ``heads`` (kind, vocabulary
  sizes and fingerprint of the exit heads the policy was trained with), ``algo``,
  ``reward_mode``, ``gamma``.

:class:`agents.policies.ExportedPolicy` loads it.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from lede_env.storage import atomic_file, atomic_folder
from lede_env.task import env_settings
from lede_env.trace_env import TraceEnv

EXPORT_FORMAT = 1


def export_policy(algo, env, out_dir: str | Path, algo_name: str = "", gamma: float | None = None,
                  onnx: bool = False) -> Path:
    """Write ``policy.pt`` + ``policy.json`` for ``algo`` trained on ``env``'s observations.

    The folder is written under a temporary name and renamed when complete.

    Args:
        algo: a trained agent from :func:`agents.train.train` (a d3rlpy algorithm or an
            :class:`agents.sb3.SB3Agent`).
        env: the ``LEDE-Llama3-v0`` env (its exits, k_max, observation layout are recorded).
        out_dir: destination folder (replaced if it exists).
        onnx: also write ``policy.onnx``.

    Returns:
        ``out_dir`` as a Path.

    Raises:
        ImportError: ``onnx=True`` without the ``onnx`` package (``pip install 'lede[onnx]'``).
    """
    u = env.unwrapped
    out = Path(out_dir)
    with atomic_folder(out) as tmp:
        save_policy_quietly(algo, tmp / "policy.pt")
        man = u.manifest  # the trace set's manifest, or the live backend's description
        cfg = {
            "env": env_settings(u),  # the source of truth of the agent's task (older readers: the keys below)
            # the whole task config it was trained in, resolved (model, prompts and sampling included):
            # LEDEEnv(TaskConfig.from_dict(...)) rebuilds that env
            "task_config": u.task_config.to_dict(),
            "format": EXPORT_FORMAT,
            "exit_layers": list(u.actions.exit_layers),
            "k_max": u.actions.k_max,
            "bonus": u.rules.bonus,
            "observation": asdict(u.obs_config),
            "stop_rule": u.rules.stop.describe(),
            "context_draft": u.rules.context_draft,
            "context_ngram": list(u.rules.context_ngram),
            "context_lengths": list(u.actions.context_lengths),
            "tree_budgets": list(u.actions.tree_budgets),
            # the datastore the context drafts fall back to (its fingerprint; None: none)
            "context_datastore": None if u.rules.datastore is None else u.rules.datastore.fingerprint(),
            # what the safety net falls back to: the best static action of the training traces
            "fallback_action": int(u.best_static()[0]) if isinstance(u, TraceEnv) else 0,
            "reward_lambda": u.reward_lambda,
            "observation_layout": u.observer.layout(),
            "model": man["model"],
            "heads": man["heads"],
            "algo": algo_name,
            "reward_mode": u.reward_mode,
            "gamma": gamma,
        }
        (tmp / "policy.json").write_text(json.dumps(cfg, indent=2))
        if onnx:
            write_onnx(tmp / "policy.pt", tmp / "policy.onnx", int(u.observer.flat_dim))
    return out


def save_policy_quietly(algo, path: Path) -> None:
    """``algo.save_policy(path)`` (TorchScript by ``torch.jit.trace``) without the tracer
    warnings known to be harmless.

    The tracer warns "Converting a tensor to a Python boolean might cause the trace to be
    incorrect" wherever traced code turns a tensor into a Python bool. Two such places run while a
    d3rlpy policy is traced, and neither decides anything the traced graph computes:

    - d3rlpy's observation scaler asserts ``x.shape == target.shape[dim_diff:]``
      (``d3rlpy/preprocessing/base.py``, ``add_leading_dims``): the scaler's mean/std shape
      against the observation's feature dimensions, which the observation layout fixes; the graph
      keeps only the broadcast, right for every batch size;
    - ``torch.distributions``' argument validation (``distribution.py``; DiscreteBCQ's imitator
      builds a ``Categorical``) checks that the logits are finite reals and raises otherwise; the
      graph keeps the logits' computation, not the check.

    ``tests/agents/test_algorithms.py`` checks every algorithm's export against the agent on a
    batch of 48. Only that message from those two modules is silenced; any other tracer warning
    still shows.
    """
    import warnings

    import torch

    with warnings.catch_warnings():
        for module in (r"d3rlpy\.preprocessing\.base", r"torch\.distributions\.distribution"):
            warnings.filterwarnings("ignore", message="Converting a tensor to a Python boolean",
                                    category=torch.jit.TracerWarning, module=module)
        algo.save_policy(str(path))


def write_onnx(pt: Path, dest: Path, flat_dim: int) -> Path:
    """Convert a TorchScript policy (``policy.pt``) to ONNX (opset 17, dynamic batch).

    Args:
        pt: the TorchScript file; dest: the ``.onnx`` file to write (atomically).
        flat_dim: width of the flat observation.

    Raises:
        ImportError: the ``onnx`` package is missing (``pip install 'lede[onnx]'``).
    """
    import warnings

    import torch

    try:
        import onnx  # noqa: F401 - the exporter needs it
    except ImportError as e:
        raise ImportError("ONNX export needs the onnx package: pip install 'lede[onnx]' (onnx, onnxruntime).") from e
    module = torch.jit.load(str(pt), map_location="cpu").eval()
    with atomic_file(dest, suffix=".onnx") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter warns that it is deprecated
        torch.onnx.export(module, (torch.zeros(1, flat_dim),), str(tmp), dynamo=False, opset_version=17,
                          input_names=["obs"], output_names=["action"],
                          dynamic_axes={"obs": {0: "batch"}, "action": {0: "batch"}})
    return dest
