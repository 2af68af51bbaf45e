"""Device and weight dtype: which torch device and dtype lede runs a model in.

``lede --device/--dtype`` (and the benchmarks' options) set ``$LEDE_DEVICE`` / ``$LEDE_DTYPE``
through :func:`set_default_device`; every later choice reads them (:func:`resolve_device`,
:func:`resolve_dtype`). The dtype is part of the MDP a dataset records (:func:`spec_dtype`).
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from .sharding import launcher_local_rank


#: accepted spellings of each weight dtype, and the short tag used in cache keys and manifests
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}
_DTYPE_TAGS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def resolve_device(device: "Optional[str | torch.device]" = None) -> torch.device:
    """The torch device lede runs a model on.

    ``None`` reads ``$LEDE_DEVICE`` (set by ``lede --device``), else ``"cpu"``. ``"auto"`` is
    ``"cuda"`` when a GPU is visible, else ``"cpu"``. A bare ``"cuda"`` under a launcher that sets
    ``LOCAL_RANK`` (torchrun, ``accelerate launch``) is ``cuda:LOCAL_RANK``, one GPU per rank.

    Raises:
        ValueError: an unknown device string, CUDA asked for where none is available (use
            ``--device cpu``), or a malformed ``LOCAL_RANK``.
    """
    if isinstance(device, torch.device):
        return device
    name = (device or os.environ.get("LEDE_DEVICE") or "cpu").strip().lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        local = launcher_local_rank()  # one GPU per torchrun / accelerate launch process
        if local is not None:
            name = f"cuda:{local}"
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"Unknown device {name!r}: use cpu, cuda, cuda:N or auto.") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"Device {name!r}: CUDA is not available on this machine (torch {torch.__version__}); "
                             "use --device cpu (fp32), or install a CUDA build of torch.")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"Device {name!r}: only {torch.cuda.device_count()} GPU(s) are visible.")
    elif dev.type != "cpu":
        raise ValueError(f"Device {name!r} is not supported: use cpu or cuda.")
    return dev


def resolve_dtype(dtype: "Optional[str | torch.dtype]" = None, device: "Optional[str | torch.device]" = None
                  ) -> torch.dtype:
    """The weight dtype lede loads a model in.

    ``None`` or ``"auto"`` reads ``$LEDE_DTYPE`` (set by ``lede --dtype``), else bf16 on CUDA and
    fp32 on CPU (where greedy equivalence is exact and bf16 matmuls are slow).

    Raises:
        ValueError: an unknown dtype (the message lists the accepted names).
    """
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPE_TAGS:
            raise ValueError(f"dtype {dtype} is not supported: use one of fp32, bf16, fp16.")
        return dtype
    name = dtype if dtype not in (None, "auto") else os.environ.get("LEDE_DTYPE") or "auto"
    name = name.strip().lower()
    if name == "auto":
        return torch.bfloat16 if resolve_device(device).type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"Unknown dtype {name!r}: use one of {', '.join(DTYPES)} or auto.")
    return DTYPES[name]


def set_default_device(device: Optional[str] = None, dtype: Optional[str] = None) -> tuple[torch.device, torch.dtype]:
    """Make ``device`` / ``dtype`` this process's defaults (``$LEDE_DEVICE`` / ``$LEDE_DTYPE``), as
    ``lede --device/--dtype`` and the benchmarks' ``--device/--dtype`` do; ``None`` leaves a
    default as it is.

    Returns:
        the resolved ``(device, dtype)``.

    Raises:
        ValueError: as :func:`resolve_device` / :func:`resolve_dtype`, before anything is set.
    """
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if device is not None:
        os.environ["LEDE_DEVICE"] = str(dev)
    if dtype is not None:
        os.environ["LEDE_DTYPE"] = dtype_tag(dt)
    return dev, dt


def dtype_tag(dtype: torch.dtype) -> str:
    """Short name of a weight dtype: ``"fp32"``, ``"bf16"`` or ``"fp16"``."""
    return _DTYPE_TAGS.get(dtype, str(dtype).replace("torch.", ""))


def spec_dtype() -> dict:
    """``{"dtype": tag}`` for env specs when this process's default dtype (``lede --dtype``, bf16
    on CUDA) is not fp32, else ``{}``: the dtype changes greedy continuations, so it is part of
    the MDP a dataset records (fp32 specs stay as they were)."""
    tag = dtype_tag(resolve_dtype(None))
    return {} if tag == "fp32" else {"dtype": tag}


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued kernels (CUDA); a no-op on CPU. Call before reading a clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)

