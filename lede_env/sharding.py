"""Splitting work into ``n`` shards (``--shard k/n``) that n processes or machines run apart.

Shard ``k`` of ``n`` (1-based) owns the items ``i`` with ``i % n == k - 1``: every item belongs to
exactly one shard, shards differ in size by at most one, and the split depends only on (i, n),
never on the order the shards run in.

``--shard auto`` takes the shard from a launcher: ``torchrun`` and ``accelerate launch`` start one
process per GPU with ``RANK`` (0-based, over all machines) and ``WORLD_SIZE`` set, so process
``RANK`` runs shard ``RANK+1`` of ``WORLD_SIZE``. The processes share nothing but the lede cache
folder (no process group, no NCCL), so any launcher that sets those two variables works.
"""

from __future__ import annotations

import os
import re
from typing import Mapping, Optional

_SHARD_RE = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


AUTO = "auto"


def _env_int(env: Mapping[str, str], name: str) -> Optional[int]:
    """``int(env[name])`` (``None`` when unset or empty); ValueError naming the variable otherwise."""
    raw = env.get(name)
    if raw is None or not raw.strip():
        return None
    try:
        return int(raw.strip())
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not an integer (set by torchrun/accelerate launch).") from None


def launcher_shard(env: Optional[Mapping[str, str]] = None) -> tuple[int, int]:
    """The shard ``(RANK + 1, WORLD_SIZE)`` of this process under ``torchrun`` or ``accelerate
    launch`` (both set ``RANK`` and ``WORLD_SIZE``), read from ``env`` (default ``os.environ``).

    Raises:
        ValueError: ``RANK`` or ``WORLD_SIZE`` unset (not started by a launcher; the message
            says to give ``K/N`` instead), not integers, or not ``0 <= RANK < WORLD_SIZE``.
    """
    env = os.environ if env is None else env
    rank, world = _env_int(env, "RANK"), _env_int(env, "WORLD_SIZE")
    if rank is None or world is None:
        missing = " and ".join(v for v, x in (("RANK", rank), ("WORLD_SIZE", world)) if x is None)
        raise ValueError(f"--shard auto needs torchrun/accelerate launch (RANK and WORLD_SIZE); give K/N instead "
                         f"({missing} not set).")
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"--shard auto: RANK={rank}, WORLD_SIZE={world}: need WORLD_SIZE >= 1 and "
                         "0 <= RANK < WORLD_SIZE.")
    return rank + 1, world


def launcher_local_rank(env: Optional[Mapping[str, str]] = None) -> Optional[int]:
    """This process's GPU index on its machine under ``torchrun`` / ``accelerate launch``
    (``LOCAL_RANK``, read from ``env``, default ``os.environ``), or ``None`` when not launched so.

    Device selection uses it to put each rank on its own GPU: ``cuda:{launcher_local_rank()}``
    instead of ``cuda`` (= ``cuda:0`` for every rank of the machine).

    Raises:
        ValueError: ``LOCAL_RANK`` set but not a non-negative integer.
    """
    env = os.environ if env is None else env
    local = _env_int(env, "LOCAL_RANK")
    if local is not None and local < 0:
        raise ValueError(f"LOCAL_RANK={local} is negative.")
    return local


def parse_shard(shard: Optional[str]) -> Optional[tuple[int, int]]:
    """Parse ``"k/n"`` into ``(k, n)`` (``None`` stays ``None``: no sharding); ``"auto"`` is
    the launcher's shard (:func:`launcher_shard`: ``(RANK + 1, WORLD_SIZE)``).

    Raises:
        ValueError: not of the form ``K/N`` with integers ``1 <= K <= N`` (e.g. ``"3/2"``, ``"x"``,
            ``"0/4"``), or ``"auto"`` outside torchrun/accelerate launch or with malformed
            ``RANK``/``WORLD_SIZE``; the message names the expected form.
    """
    if shard is None:
        return None
    if isinstance(shard, str) and shard.strip().lower() == AUTO:
        return launcher_shard()
    if isinstance(shard, tuple):
        k, n = shard
    else:
        m = _SHARD_RE.match(str(shard))
        if not m:
            raise ValueError(f"shard {shard!r} is not of the form K/N (e.g. --shard 2/4 = second of four parts) "
                             "or auto (under torchrun/accelerate launch).")
        k, n = int(m.group(1)), int(m.group(2))
    if not 1 <= k <= n:
        raise ValueError(f"shard {k}/{n}: need 1 <= K <= N (shards are numbered 1..N, e.g. --shard 1/{max(n, 1)}).")
    return int(k), int(n)


def shard_indices(total: int, shard: Optional[tuple[int, int]]) -> list[int]:
    """The item indices in ``range(total)`` owned by ``shard`` (all of them when ``None``)."""
    if shard is None:
        return list(range(total))
    k, n = shard
    return list(range(k - 1, total, n))
