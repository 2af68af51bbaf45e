"""Splitting work into ``n`` shards (``--shard k/n``) that n processes or machines run apart.

Shard ``k`` of ``n`` (1-based) owns the items ``i`` with ``i % n == k - 1``: every item belongs to
exactly one shard, shards differ in size by at most one, and the split depends only on (i, n),
never on the order the shards run in.
"""

from __future__ import annotations

import re
from typing import Optional

_SHARD_RE = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


def parse_shard(shard: Optional[str]) -> Optional[tuple[int, int]]:
    """Parse ``"k/n"`` into ``(k, n)`` (``None`` stays ``None``: no sharding).

    Raises:
        ValueError: not of the form ``K/N`` with integers ``1 <= K <= N`` (e.g. ``"3/2"``, ``"x"``,
            ``"0/4"``); the message names the expected form.
    """
    if shard is None:
        return None
    if isinstance(shard, tuple):
        k, n = shard
    else:
        m = _SHARD_RE.match(str(shard))
        if not m:
            raise ValueError(f"shard {shard!r} is not of the form K/N (e.g. --shard 2/4 = second of four parts).")
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
