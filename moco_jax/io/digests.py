"""Checksums of a saved training state: what a checkpoint's `meta` records,
and what a restore recomputes from the values it read back.

A digest is BLAKE2b of an array's dtype, shape and bytes: a function of the
data alone, the same in every process, interpreter and host. A leaf without
data (None, e.g. MoCo v3's absent queue, or an empty node) is recorded as
`NO_DATA`; anything else that is not a plain array is refused rather than
hashed (`np.asarray` of an arbitrary object would hash its address).

Formats (`meta["format"]`):
  2  moco_jax 0.2: digests of arrays as above, but a None leaf was hashed as
     an object array, i.e. by the address of None, which differs between
     processes. Still read: those digests (`queue`, `queue_ptr` of MoCo v3)
     are ignored, with one warning, and every array is verified.
  3  this version: None and empty leaves recorded as `NO_DATA`.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
from flax import traverse_util

FORMAT = 3
NO_DATA = "none"  # the digest of a leaf without data (None, an empty node)
# The leaves that format 2 hashed by address when they were None (MoCo v3 has no queue).
LEGACY_NONE_PATHS = ("queue", "queue_ptr")


class DamagedCheckpointError(Exception):
    """A finished checkpoint whose files do not give back what was saved."""


def flat_leaves(tree: Any) -> dict[str, Any]:
    """{"params/encoder/...": leaf} of a (nested dict) state; empty nodes
    are kept (as `traverse_util.empty_node`), so that they are recorded too."""
    if not isinstance(tree, dict):
        return {"": tree}
    return traverse_util.flatten_dict(tree, keep_empty_nodes=True, sep="/")


def has_no_data(leaf: Any) -> bool:
    return leaf is None or leaf is traverse_util.empty_node or (isinstance(leaf, (dict, tuple)) and not leaf)


def leaf_digest(leaf: Any) -> str:
    """BLAKE2b of (dtype, shape, bytes) of an array leaf; `NO_DATA` for None
    or an empty node; TypeError for anything else (it would hash an address)."""
    if has_no_data(leaf):
        return NO_DATA
    array = np.asarray(leaf)
    if array.dtype.hasobject:
        raise TypeError(f"cannot checksum a leaf of type {type(leaf).__name__}: a saved state holds arrays and None")
    h = hashlib.blake2b(f"{array.dtype.str}{array.shape}".encode(), digest_size=16)
    h.update(np.ascontiguousarray(array).data)
    return h.hexdigest()


def array_digests(tree: Any) -> dict[str, str]:
    """{path: leaf_digest} for every leaf of a (nested dict) state."""
    return {path: leaf_digest(leaf) for path, leaf in sorted(flat_leaves(tree).items())}


def meta_digest(meta: dict) -> str:
    """The digest of everything in `meta` but its checksums (after a JSON round trip)."""
    body = {k: v for k, v in meta.items() if k != "checksums"}
    return hashlib.blake2b(json.dumps(body, sort_keys=True).encode(), digest_size=16).hexdigest()


def with_checksums(meta: dict, state_dict: Any) -> dict:
    """`meta` (JSON-ready) with the checksums of itself and of `state_dict`."""
    meta = dict(meta, format=FORMAT)
    return dict(meta, checksums={"meta": meta_digest(meta), "state": array_digests(state_dict)})


def verify_meta(meta: Any) -> dict:
    """`meta` if its checksum matches, else DamagedCheckpointError."""
    if not isinstance(meta, dict) or not isinstance(meta.get("checksums"), dict):
        raise DamagedCheckpointError("it has no checksums (written by an older moco_jax, or its metadata was altered)")
    if meta["checksums"].get("meta") != meta_digest(meta):
        raise DamagedCheckpointError("its metadata does not match its checksum")
    return meta


def verify_arrays(restored: Any, meta: dict) -> list[str]:
    """DamagedCheckpointError unless every leaf read back has the digest it
    was saved with and every float array is finite. Returns the paths whose
    recorded digest was ignored (format 2's None leaves; see the module
    docstring)."""
    expected, found = meta["checksums"]["state"], flat_leaves(restored)
    ignored = [p for p in LEGACY_NONE_PATHS
               if meta.get("format", 2) < 3 and p in expected and p in found and found[p] is None]
    bad = [p for p in sorted(expected.keys() | found.keys()) if p not in ignored
           and expected.get(p, NO_DATA) != (leaf_digest(found[p]) if p in found else NO_DATA)]
    if bad:
        raise DamagedCheckpointError(f"{len(bad)} of {len(expected)} arrays differ from their checksums "
                                     f"(first: {bad[0]})")
    for path, leaf in found.items():
        if not has_no_data(leaf) and np.asarray(leaf).dtype.kind == "f" and not np.all(np.isfinite(leaf)):
            raise DamagedCheckpointError(f"it holds non-finite values (in {path})")
    return ignored
