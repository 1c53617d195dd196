"""What zPROBE's protocol gives the server, simulated: secure sums of clusters, one-bit proofs, samples.

Both zPROBE filters build on these pieces (`strategies/zprobe.py`, the paper's method, and
`strategies/zprobe_refined.py`, its screening-and-refinement extension), so the privacy boundary
is the same code in both:

- secure aggregation within clusters (`random_clusters`, `mask_updates`, `cluster_sums`): each
  client's vector is its update in a fixed-point ring (Z mod 2^64, `FIXED_POINT_BITS` fractional
  bits) plus pairwise masks shared with the other members of its cluster; for a pair i < j the
  mask comes from a generator seeded by (seed, i, j), i adds it and j subtracts it. A masked
  vector alone is uniform on the ring, whatever the update; the masks cancel exactly in a
  cluster's sum. Clusters of one client are refused: their "sum" would be the update itself;
- the clients' prover (`make_prover`), standing in for the paper's zero-knowledge proof: given
  the server's public statement (sampled coordinates, centre and threshold there, number of
  exceedances allowed) it answers one bit, whether the update satisfies it;
- further secure-aggregation rounds among subsets the server chooses (`make_uploader`);
- the server's random coordinate sample (`sample_coordinates`) and its size from the paper's
  Eq. 2 (`eq2_samples`).
The raw updates stay inside the prover and uploader closures: a filter that receives only masked
vectors, cluster sums and proof bits cannot see an individual update.

The ring has a fixed scale: one client cannot change the encoding of the others. What keeps a
single client from breaking it is the reply hygiene (strategies/base.py, its bound in strategies/reply_values.py): a reply with a value
beyond `MAX_VALUE` (2^16) is refused with its reason before any defence runs, and the global
state never holds one either, so an update is at most 2^17 in magnitude and any cluster of fewer
than 2^13 = 8192 clients sums inside the ring. `mask_updates` still raises on a
vector that does not fit, for callers that skip the hygiene.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

# Secure aggregation works in the ring Z mod 2^64 with this many fractional bits: resolution
# 2^-32 (2.3e-10) and sums up to 2^31 in magnitude, far beyond LoRA update magnitudes.
FIXED_POINT_BITS = 32
_SCALE = float(2**FIXED_POINT_BITS)
_RING_LIMIT = 2.0**62  # |sum of a cluster| in fixed point must stay below 2^63

# Below this per-coordinate threshold the fixed-point rounding of the centre (a few 2^-33)
# would count as an exceedance where every client sent exactly the same value.
THRESHOLD_FLOOR = 16.0 / _SCALE

Prover = Callable[[int, Tensor, Tensor, Tensor, int], bool]
Uploader = Callable[[Sequence[Sequence[int]]], dict[int, Tensor]]


def random_clusters(n: int, c: int, seed: int) -> list[list[int]]:
    """A random partition of range(n) into c clusters whose sizes differ by at most one (members sorted)."""
    if not 1 <= c <= n:
        raise ValueError(f"random_clusters: need 1 <= c <= n, got c = {c}, n = {n}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    base, extra = divmod(n, c)
    clusters, start = [], 0
    for j in range(c):
        size = base + (1 if j < extra else 0)
        clusters.append(sorted(order[start : start + size]))
        start += size
    return clusters


def check_partition(clusters: Sequence[Sequence[int]], members: set[int], where: str) -> None:
    """Raise ValueError unless clusters partition `members` into clusters of at least two."""
    seen = [i for cluster in clusters for i in cluster]
    if sorted(seen) != sorted(members) or len(seen) != len(set(seen)):
        raise ValueError(f"{where}: clusters must partition the clients, each exactly once")
    if any(len(cluster) < 2 for cluster in clusters):
        raise ValueError(f"{where}: every cluster needs at least 2 clients (a cluster of one would reveal its update)")


def _to_ring(update: Tensor, cluster_size: int) -> np.ndarray:
    """An update in fixed point, as uint64 ring elements (two's complement)."""
    if update.ndim != 1 or not update.is_floating_point():
        raise ValueError(f"mask_updates: updates must be 1-D float tensors, got {update.dtype} of shape {tuple(update.shape)}")
    values = update.detach().to(torch.float64).cpu().numpy() * _SCALE
    if not np.all(np.isfinite(values)):
        raise ValueError("mask_updates: an update holds NaN or Inf")
    if values.size and np.abs(values).max() * cluster_size >= _RING_LIMIT:
        limit = _RING_LIMIT / _SCALE / cluster_size
        raise ValueError(f"mask_updates: an update exceeds {limit:.3g} in magnitude, too large for the fixed-point ring")
    return np.rint(values).astype(np.int64).view(np.uint64)


def _pair_mask(seed: int, i: int, j: int, dim: int) -> np.ndarray:
    """The mask clients i < j share: uniform on the ring, from a generator seeded by (seed, i, j)."""
    entropy = int.from_bytes(hashlib.blake2b(f"zprobe-mask:{seed}:{i}:{j}".encode(), digest_size=16).digest(), "little")
    return np.random.PCG64(entropy).random_raw(dim)


def _mask(updates: Mapping[int, Tensor], clusters: Sequence[Sequence[int]], seed: int) -> dict[int, Tensor]:
    """Masked ring vectors (as int64 tensors) of the clients in `clusters`, keyed by client."""
    masked: dict[int, Tensor] = {}
    for cluster in clusters:
        ring = {i: _to_ring(updates[i], len(cluster)) for i in cluster}
        dims = {r.shape[0] for r in ring.values()}
        if len(dims) != 1:
            raise ValueError(f"mask_updates: updates in a cluster differ in length: {sorted(dims)}")
        (dim,) = dims
        for i, j in itertools.combinations(sorted(cluster), 2):
            mask = _pair_mask(seed, i, j, dim)
            ring[i] = ring[i] + mask  # uint64 arithmetic wraps: addition mod 2^64
            ring[j] = ring[j] - mask
        masked.update({i: torch.from_numpy(r.view(np.int64)) for i, r in ring.items()})
    return masked


def mask_updates(updates: Sequence[Tensor], clusters: Sequence[Sequence[int]], seed: int) -> list[Tensor]:
    """Each client's update as secure aggregation sends it: fixed point plus pairwise masks (int64 ring elements).

    `clusters` must partition range(len(updates)) into clusters of at least two. For each pair
    i < j of a cluster, a mask uniform on Z mod 2^64 is drawn from (seed, i, j); i adds it, j
    subtracts it. Any one masked vector is uniform on the ring; a cluster's sum is exact.
    """
    check_partition(clusters, set(range(len(updates))), "mask_updates")
    masked = _mask(dict(enumerate(updates)), clusters, seed)
    return [masked[i] for i in range(len(updates))]


def cluster_sums(masked: Sequence[Tensor] | Mapping[int, Tensor], clusters: Sequence[Sequence[int]]) -> Tensor:
    """The sum of each cluster's updates (c x dim, float64), from the masked vectors alone.

    Sums in the ring (masks cancel exactly), then reads the result back from fixed point.
    """
    rows = []
    for cluster in clusters:
        if not cluster:
            raise ValueError("cluster_sums: empty cluster")
        if any(masked[i].dtype != torch.int64 for i in cluster):
            raise ValueError("cluster_sums: masked vectors must be the int64 ring elements mask_updates returns")
        total = masked[cluster[0]].numpy().view(np.uint64).copy()
        for i in cluster[1:]:
            total += masked[i].numpy().view(np.uint64)
        rows.append(torch.from_numpy(total.view(np.int64).astype(np.float64) / _SCALE))
    return torch.stack(rows)


def make_prover(updates: Sequence[Tensor]) -> Prover:
    """The clients' side of the check, standing in for the zero-knowledge proof: one bit per statement.

    prove(client, coords, centre, threshold, max_exceed) is True iff at most max_exceed of the
    coordinates `coords` of the client's update lie farther than `threshold` from `centre`
    (centre and threshold given at those coordinates only).
    """
    raw = [u.detach().to(torch.float64).cpu() for u in updates]

    def prove(client: int, coords: Tensor, centre: Tensor, threshold: Tensor, max_exceed: int) -> bool:
        if not (coords.shape == centre.shape == threshold.shape and coords.ndim == 1):
            raise ValueError("prove: coords, centre and threshold must be 1-D of the same length")
        values = raw[client][coords]
        return int(((values - centre).abs() > threshold).sum()) <= max_exceed

    return prove


def make_uploader(updates: Sequence[Tensor], seed: int) -> Uploader:
    """A fresh secure-aggregation round on request: upload(clusters) -> {client: masked vector}.

    Only the clients named in `clusters` take part; every call masks with new pairwise masks
    (seeds derived from `seed` and the call's number), as a new protocol run would.
    """
    by_client = dict(enumerate(updates))
    calls = itertools.count(1)

    def upload(clusters: Sequence[Sequence[int]]) -> dict[int, Tensor]:
        members = {i for cluster in clusters for i in cluster}
        if not members <= by_client.keys():
            raise ValueError("upload: unknown client in clusters")
        check_partition(clusters, members, "upload")
        return _mask(by_client, clusters, protocol_seed(seed, next(calls), "zprobe-round"))

    return upload


def protocol_seed(seed: int, index: int, purpose: str = "zprobe-clusters") -> int:
    """A non-negative 63-bit seed for (purpose, seed, index), independent of the coordinate sampling."""
    digest = hashlib.blake2b(f"{purpose}:{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def median_rows(values: Tensor) -> Tensor:
    """Median over dim 0, the mean of the two middle values for an even count (as numpy.median)."""
    ordered = values.sort(dim=0).values
    count = values.shape[0]
    return 0.5 * (ordered[(count - 1) // 2] + ordered[count // 2])


def eq2_samples(s_m: float, delta: float) -> int:
    """The paper's Eq. 2: the smallest q with (1 - s_m)^q <= delta (all q coordinates must pass)."""
    if not (0 < s_m < 1 and 0 < delta < 1):
        raise ValueError(f"eq2_samples: s_m and delta must be in (0, 1), got {s_m}, {delta}")
    return max(1, math.ceil(math.log(delta) / math.log1p(-s_m) - 1e-12))


def sample_coordinates(dim: int, q: int, generator: torch.Generator) -> Tensor:
    """q distinct coordinates of range(dim), uniformly (all of them when q >= dim), sorted."""
    if q >= dim:
        return torch.arange(dim)
    return torch.randperm(dim, generator=generator)[:q].sort().values
