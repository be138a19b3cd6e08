"""What both host pipelines do with an image they cannot decode (corrupt,
truncated, not an image): by default stop with an error naming it; with
`skip_corrupt_images` log it and go on. In pretraining its slot in the batch
is then filled with another image of the same step (`fill_gaps`), so batches
stay full and a resumed run still sees the same batches; the labelled arrays
leave it out."""
from __future__ import annotations

from typing import Optional

import numpy as np
from absl import logging

from moco_jax.data.source import UndecodableImageError


def error(what: str, reason: str) -> UndecodableImageError:
    """The error that names an undecodable image: `what` says where it is
    ('file PATH', a record of a split), `reason` why it failed."""
    return UndecodableImageError(f"cannot decode image {what} ({reason}); remove it, or set "
                                 "--config.skip_corrupt_images=True to skip undecodable images")


def log_skipped(what: str, skipped: Optional[int] = None) -> None:
    """Log one skipped image; in pretraining with the running count
    `skipped` (this one included)."""
    if skipped is None:
        logging.warning("skipping undecodable image %s", what)
    else:
        logging.warning("skipping undecodable image %s (%d skipped so far)", what, skipped)


def fill_gaps(batch: np.ndarray, ok: np.ndarray) -> None:
    """Fill, in place, each slot of `batch` whose image failed (ok False)
    with the nearest decoded image before it (else after).

    Args:
      batch: (n, ...), one step's images or crops.
      ok: bool (n,), which decoded; at least one does.
    """
    valid = np.flatnonzero(ok)
    nearest = valid[np.clip(np.searchsorted(valid, np.arange(len(ok))) - 1, 0, None)]
    batch[~ok] = batch[nearest[~ok]]
