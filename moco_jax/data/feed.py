"""Host batches onto the devices of the pmap axis, a few steps ahead."""
from __future__ import annotations

import collections
import itertools
from typing import Iterator, Optional, Sequence

from moco_jax.core import sharding


def prefetch_to_device(iterator: Iterator, size: int = 2,
                       devices: Optional[Sequence] = None) -> Iterator:
    """Yield `sharding.shard(x)` (slice i on local device i) for x in iterator,
    `size` batches ahead.

    device_put is asynchronous, so keeping `size` transfers in flight lets
    the host->device copy of the next batches overlap the current step.
    """
    if size < 1:
        raise ValueError(f"prefetch size must be >= 1, got {size}")
    queue = collections.deque()
    iterator = iter(iterator)

    def enqueue(n):
        for batch in itertools.islice(iterator, n):
            queue.append(sharding.shard(batch, devices))

    enqueue(size)
    while queue:
        yield queue.popleft()
        enqueue(1)
