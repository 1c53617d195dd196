"""zprobe_refined: a screening-and-refinement filter built on zPROBE's pieces; NOT the paper's method.

It departs from zPROBE (Ghodsi et al., arXiv 2206.12100 v3, sections 3.1-3.3; the paper's rule
runs as `zprobe`, strategies/zprobe.py) in six ways:
1. spread: a bias-corrected MAD of the cluster means times sqrt(m) (one client's spread), not
   the standard deviation of the cluster means;
2. check: a client passes with up to t of its q sampled coordinates out of bounds (t = 15 of
   q = 101 by default), where the paper requires every sampled coordinate within the bound
   (and q from Eq. 2 alone, 17 at the same S_m and delta);
3. eta: a fixed Chebyshev value, 1 / sqrt(coord_rate) = 3.16, not set per round from phi_max;
4. clusters of 3 (c = n // 3) for phi_max >= 0.16, larger for smaller phi_max (6 at 0.1), not
   the paper's c = 7;
5. a screening (a bisection of each client's pass level, `search_steps` statements per client)
   and up to two refinement runs of `refine_rounds` rounds each, every round a fresh secure
   aggregation in new clusters: up to 1 + 2 * refine_rounds secure aggregations and about
   search_steps + 2 * refine_rounds statements per client a round (7 and 16 at the defaults),
   where the paper runs one secure aggregation and one statement per client;
6. so the server learns more about each client than the paper's one bit (see below).
It is kept, unchanged, so that earlier runs can be reproduced and compared. On synthetic
updates (below) it separates well; on real LoRA updates it caught 47% of sign flippers (FPR
0.18) in simulations/byzantine.toml, and with 40 clients a round, 10 of them sign flippers, it
let every client through (its screening kept 28, its refinement re-admitted the rest).

An *update* is a 1-D float tensor (a client's flattened change of the LoRA factors it trained).
The Flower wiring calls `simulate_round(updates, params, seed)` and aggregates the accepted
clients' updates with the inner strategy. The privacy boundary (masked vectors, cluster sums,
proof bits, further secure rounds) is strategies/zprobe_protocol.py's: `refined_filter` receives
nothing else.

Statistics (after sec. 3.1-3.2, with departures 1 and 4)
--------------------------------------------------------
Clients are split at random into c clusters of near-equal size m (`random_clusters`). A
cluster mean mu_j averages m_j updates, so (central limit theorem) it is close to normal with
per-coordinate spread sigma / sqrt(m_j), sigma being the spread of single updates. Per
coordinate k (`robust_bounds`):
- centre lambda^k = median over clusters of mu_j^k;
- per-client spread sigma^k = 1.4826 * b_c * median_j(|mu_j^k - lambda^k| * sqrt(m_j)). This is
  the MAD of the cluster means (sigma_mu), rescaled to one client: a single update must be
  compared with sigma ~ sigma_mu * sqrt(m), not with the sqrt(m) times narrower spread of the
  means, or every honest client would fail. 1.4826 makes the MAD consistent for normal data,
  b_c corrects its downward bias with few clusters (1.49 at c = 3, 1.14 at c = 7, -> 1);
- threshold theta^k = eta * sigma^k (the paper's eta * sigma_mu^k * sqrt(m)). Median and MAD
  keep their meaning while most clusters are attacker-free.

The check (after sec. 3.3 and Eq. 2, with departures 2 and 3)
-------------------------------------------------------------
The server samples q coordinates and each client proves |u^k - lambda^k| <= theta^k there. A
client passes if at most t of its q coordinates exceed the threshold.
- eta from Chebyshev: P(|X - mu| >= eta * sigma) <= 1 / eta^2 for any honest distribution of
  finite variance, so eta = 1 / sqrt(coord_rate) (default coord_rate = 0.1: eta = 3.16) keeps
  an honest client's expected exceedance rate on the checked coordinates at most 10%.
- t: the smallest count with P(Binomial(q, coord_rate) > t) <= max_false_rejection (default 5%):
  even in Chebyshev's worst case an honest client fails with probability at most that. The
  paper's rule, all q coordinates within the threshold (t = 0), would reject most honest
  clients once q is large, because sigma^k comes from a handful of cluster means: with c = 8
  and eta = 3.16 honest updates exceed on about 10% of the coordinates in simulation, not
  the 0.16% a known normal sigma would give.
- q: an attacker exceeding the threshold on a fraction s_m of the coordinates must be caught
  with probability at least 1 - delta, so q is the smallest with
  P(Binomial(q, s_m) <= t(q)) <= delta (`required_samples`). With t = 0 this is the paper's
  Eq. 2, (1 - s_m)^q <= delta (`eq2_samples`). Defaults s_m = 0.25, delta = 0.01: q = 101,
  t = 15.

Many attackers: screening and refinement
----------------------------------------
With a fraction phi of attackers a random cluster of m is attacker-free with probability about
(1 - phi)^m, 22% at phi = 0.4 and m = 3. The median of the cluster means then moves about a
third of the way towards a coordinated attack and the MAD grows with it, and the single check
lets the attackers through (measured: sign flip at 40% passes entirely). With an uploader,
`refined_filter` goes on:
1. screening, DESIGN.md's phi_max rule on 10 q coordinates: each client's level, the smallest multiplier kappa at
   which it passes on `screen_q` = 10 q coordinates (bisection per client on a log scale,
   `search_steps` statements), ranks the clients; the ceil((1 - phi_max) n) lowest levels are
   the screened set, the max(6, n - that) highest the outskirts;
2. refinement from each of the two starts: the base runs a fresh secure aggregation in new
   random clusters (at least 6 where the base allows, so clusters of 2 for bases under 18),
   its statistics give a check of every client at eta on fresh coordinates; the next base is
   the accepted set or, when fewer than ceil((1 - phi_max) n) were accepted (statistics of an
   attacker-dominated base), the rejected ones. A run stops when the base changes by at most
   max(1, floor(max_false_rejection * n)) clients (converged) or after `refine_rounds` rounds;
3. choice: among converged runs that accepted at least ceil((1 - phi_max) n) clients, the one
   whose thresholds are smaller on most coordinates. A set containing attackers outside the
   honest spread has wider statistics than the honest clients alone, and a set of attackers
   alone cannot reach the size. Honest clients cut by the screening are re-admitted.
The screened set alone is not used: with coordinated attackers that stay close (IPM, ALIE)
the attackers are the most central clients, and then the outskirts start finds the honest set.

Defaults (`default_parameters`)
-------------------------------
- cluster size m: the largest m with (1 - phi_max)^m >= 1/2 (most clusters expected clean),
  but at least `min_cluster_size` = 3: a cluster of two reveals a sum of two updates, and at
  m = 2 and phi = 0.4 the median cluster holds one attacker and sits half-way between honest
  and malicious updates. c = n // m, at least 3 (so at least 9 clients).
- eta = 3.16, t = 15, q = 101, screen_q = 1010, search_steps = 10, refine_rounds = 3.

Measured (tests/test_zprobe_refined.py's setting, 10 seeds: honest updates mu + 0.5 N(0, 1) with
mu ~ N(0, 1), dim 2000, phi_max = 0.4). n = 50: sign flip, scaling x10, Gaussian noise (sigma
1.5), IPM (eps 0.5) at 10%, 25% and 40% all caught, no honest client rejected; ALIE and min-max
stay within the honest spread, are not caught and cause no rejections. The single check alone
(no uploader) catches sign flip at 10% (98%) but 0% of it at 25% and 40%. n = 20: the same at
10% and 25%; at 40% (8 attackers, 6 clusters) 90% of sign flip and IPM attackers are caught,
and coordinated ALIE / min-max groups get 7% / 12% of the honest clients rejected. With no
attackers, no honest client was rejected (bound: 5% each).

What the server learns beyond the paper
---------------------------------------
About each client: up to search_steps + 2 * refine_rounds pass/fail bits, i.e. roughly where
its (t+1)-th largest normalised deviation on the screening coordinates lies. About sets of clients:
the cluster sums of several random partitions; the totals of two bases differ by the sum of
the clients between them (the paper's final aggregation over the accepted clients reveals the
sum of the rejected ones in the same way). Each refinement round costs one more secure
aggregation, so up to 1 + 2 * refine_rounds in all (the paper: 1).

Limits: more attackers than phi_max; attacks within the honest spread on most coordinates
(ALIE, min-max by design) pass, but they move the mean by little.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from strategies.robust import Defence, Screening
from strategies.zprobe_protocol import (
    THRESHOLD_FLOOR,
    Prover,
    Uploader,
    check_partition,
    cluster_sums,
    make_prover,
    make_uploader,
    mask_updates,
    median_rows,
    protocol_seed,
    random_clusters,
    sample_coordinates,
)

# Consistency of 1.4826 * MAD for c normal samples: E[1.4826 * MAD] * b_c = sigma. Measured by
# simulation (2e6 draws per c); beyond 9, c / (c - 0.8) is within 1%.
_MAD_BIAS = {3: 1.487, 4: 1.361, 5: 1.217, 6: 1.190, 7: 1.138, 8: 1.128, 9: 1.101}
_MAD_NORMAL = 1.4826


@dataclass(frozen=True)
class RefinedParams:
    """Parameters of the zPROBE filter; `default_parameters` derives them (see the module docstring).

    clusters: c, clusters of the round's secure aggregation; eta: threshold multiplier, in
    per-client sigmas; q: coordinates checked per client; max_exceed: t, exceedances allowed
    among the q; delta, s_m: an attacker exceeding on a fraction s_m of the coordinates escapes
    with probability at most delta; phi_max: upper bound on the fraction of attackers;
    coord_rate: Chebyshev bound on an honest client's exceedance rate per coordinate (1 / eta^2);
    max_false_rejection: bound on an honest client's chance to fail a check; cluster_size: m,
    largest cluster size in refinement rounds; screen_q: coordinates of the screening
    statements; search_steps: bisection steps of the screening; refine_rounds: rounds per
    refinement start.
    """

    clusters: int
    eta: float
    q: int
    delta: float
    s_m: float
    max_exceed: int
    phi_max: float
    coord_rate: float
    max_false_rejection: float
    cluster_size: int
    screen_q: int = 1000
    search_steps: int = 10
    refine_rounds: int = 3

    def __post_init__(self) -> None:
        if self.clusters < 1 or self.q < 1 or self.cluster_size < 2:
            raise ValueError("RefinedParams: clusters and q must be >= 1 and cluster_size >= 2")
        if not (self.eta > 0 and math.isfinite(self.eta)):
            raise ValueError(f"RefinedParams: eta must be a positive number, got {self.eta}")
        if not 0 <= self.max_exceed < self.q:
            raise ValueError(f"RefinedParams: max_exceed must be in [0, q), got {self.max_exceed} with q = {self.q}")
        for name in ("delta", "s_m", "coord_rate", "max_false_rejection"):
            value = getattr(self, name)
            if not 0.0 < value < 1.0:
                raise ValueError(f"RefinedParams: {name} must be in (0, 1), got {value}")
        if not 0.0 <= self.phi_max < 0.5:
            raise ValueError(f"RefinedParams: phi_max must be in [0, 0.5), got {self.phi_max}")
        if self.search_steps < 1 or self.refine_rounds < 1 or self.screen_q < 1:
            raise ValueError("RefinedParams: screen_q, search_steps and refine_rounds must be >= 1")


@dataclass
class RefinedResult:
    """One round of the filter: who passed, and the public statistics the decision used.

    centre and threshold are those of the final check (float64, full dimension); coords the
    coordinates it sampled. screened: the clients the screening kept (all clients when none
    ran); screen_multiplier: the largest level among them (kappa; nan without screening);
    queries: statements put to each client; aggregation_rounds: secure-aggregation rounds run.
    """

    accepted: list[int]
    rejected: list[int]
    centre: Tensor
    threshold: Tensor
    coords: Tensor
    screened: list[int] = field(default_factory=list)
    screen_multiplier: float = float("nan")
    queries: int = 0
    aggregation_rounds: int = 1

    def summary(self) -> dict[str, float | int]:
        """Scalars for the round history: counts, threshold statistics on the checked coordinates."""
        checked = self.threshold[self.coords]
        return {
            "accepted": len(self.accepted),
            "rejected": len(self.rejected),
            "screened": len(self.screened),
            "screen_multiplier": self.screen_multiplier,
            "threshold_median": float(checked.median()) if checked.numel() else float("nan"),
            "threshold_max": float(checked.max()) if checked.numel() else float("nan"),
            "queries": self.queries,
            "aggregation_rounds": self.aggregation_rounds,
        }


# ---------------------------------------------------------------- statistics and parameters


@dataclass(frozen=True)
class Bounds:
    """Per-coordinate centre lambda and per-client spread sigma (threshold = multiplier * sigma)."""

    centre: Tensor
    sigma: Tensor

    def threshold(self, multiplier: float) -> Tensor:
        """theta = multiplier * sigma, never below the fixed-point rounding floor."""
        return (multiplier * self.sigma).clamp_min(THRESHOLD_FLOOR)


def mad_bias(c: int) -> float:
    """b_c: the factor making 1.4826 * MAD of c >= 3 normal values unbiased for sigma."""
    if c < 3:
        raise ValueError(f"mad_bias: needs at least 3 values, got {c}")
    return _MAD_BIAS.get(c, c / (c - 0.8))


def robust_bounds(sums: Tensor, sizes: Sequence[int]) -> Bounds:
    """Centre (median of cluster means) and per-client spread (rescaled MAD of cluster means).

    sums: c x dim cluster sums; sizes: members per cluster. sigma^k =
    1.4826 * b_c * median_j(|mu_j^k - lambda^k| * sqrt(m_j)), which estimates the spread of a
    single update: the cluster means spread as sigma / sqrt(m_j).
    """
    if sums.ndim != 2 or sums.shape[0] != len(sizes) or min(sizes, default=0) < 1:
        raise ValueError("robust_bounds: sums must be c x dim with one positive size per cluster")
    if len(sizes) < 3:
        raise ValueError(f"robust_bounds: a median and MAD need at least 3 clusters, got {len(sizes)}")
    size = torch.tensor(list(sizes), dtype=torch.float64)[:, None]
    means = sums.to(torch.float64) / size
    centre = median_rows(means)
    spread = median_rows((means - centre).abs() * size.sqrt())
    return Bounds(centre=centre, sigma=_MAD_NORMAL * mad_bias(len(sizes)) * spread)


def _log_binom_pmf(q: int, p: float, k: int) -> float:
    return math.lgamma(q + 1) - math.lgamma(k + 1) - math.lgamma(q - k + 1) + k * math.log(p) + (q - k) * math.log1p(-p)


def binomial_cdf(q: int, p: float, t: int) -> float:
    """P(Binomial(q, p) <= t)."""
    if t < 0:
        return 0.0
    if t >= q:
        return 1.0
    return min(1.0, sum(math.exp(_log_binom_pmf(q, p, k)) for k in range(t + 1)))


def allowed_exceedances(q: int, coord_rate: float, max_false_rejection: float) -> int:
    """t: the fewest exceedances to allow so that P(Binomial(q, coord_rate) > t) <= max_false_rejection."""
    t = 0
    while t < q and 1.0 - binomial_cdf(q, coord_rate, t) > max_false_rejection:
        t += 1
    return t


def required_samples(
    s_m: float, delta: float, coord_rate: float, max_false_rejection: float, limit: int = 100_000
) -> tuple[int, int]:
    """(q, t): the smallest q with P(Binomial(q, s_m) <= t(q)) <= delta, t(q) = allowed_exceedances.

    An attacker exceeding the threshold on a fraction s_m of the coordinates then escapes all
    checks with probability at most delta, while an honest client (exceeding on at most a
    fraction coord_rate) is rejected with probability at most max_false_rejection. With
    t = 0 this is Eq. 2 of the paper.
    """
    for name, value in (("s_m", s_m), ("delta", delta), ("coord_rate", coord_rate), ("max_false_rejection", max_false_rejection)):
        if not 0.0 < value < 1.0:
            raise ValueError(f"required_samples: {name} must be in (0, 1), got {value}")
    if s_m <= coord_rate:
        raise ValueError(
            f"required_samples: s_m ({s_m}) must exceed coord_rate ({coord_rate}): honest clients may exceed that often"
        )
    t = 0
    for q in range(1, limit + 1):
        while t < q and 1.0 - binomial_cdf(q, coord_rate, t) > max_false_rejection:
            t += 1
        if binomial_cdf(q, s_m, t) <= delta:
            return q, t
    raise ValueError(f"required_samples: no q <= {limit} separates s_m = {s_m} from coord_rate = {coord_rate}; raise s_m")


def cluster_size_for(phi_max: float, min_cluster_size: int = 3) -> int:
    """The largest m with (1 - phi_max)^m >= 1/2 (most clusters expected attacker-free), at least min_cluster_size."""
    if not 0.0 <= phi_max < 0.5:
        raise ValueError(f"phi_max must be in [0, 0.5), got {phi_max}")
    largest = math.floor(math.log(0.5) / math.log1p(-phi_max)) if phi_max > 0 else 10**9
    return max(min_cluster_size, largest)


def default_parameters(
    num_clients: int,
    phi_max: float,
    *,
    coord_rate: float = 0.1,
    max_false_rejection: float = 0.05,
    s_m: float = 0.25,
    delta: float = 0.01,
    min_cluster_size: int = 3,
    min_clusters: int = 3,
    screen_factor: int = 10,
    search_steps: int = 10,
    refine_rounds: int = 3,
) -> RefinedParams:
    """Parameters for a round of `num_clients` with at most a fraction phi_max of attackers (see the module docstring)."""
    if min_cluster_size < 2 or min_clusters < 3:
        raise ValueError("default_parameters: min_cluster_size must be >= 2 and min_clusters >= 3")
    if num_clients < min_cluster_size * min_clusters:
        raise ValueError(
            f"zPROBE needs at least {min_cluster_size * min_clusters} clients per round "
            f"({min_clusters} clusters of {min_cluster_size}); got {num_clients}"
        )
    size = cluster_size_for(phi_max, min_cluster_size)
    clusters = max(min_clusters, num_clients // size)
    q, t = required_samples(s_m, delta, coord_rate, max_false_rejection)
    return RefinedParams(
        clusters=clusters,
        eta=1.0 / math.sqrt(coord_rate),
        q=q,
        delta=delta,
        s_m=s_m,
        max_exceed=t,
        phi_max=phi_max,
        coord_rate=coord_rate,
        max_false_rejection=max_false_rejection,
        cluster_size=num_clients // clusters,
        screen_q=screen_factor * q,
        search_steps=search_steps,
        refine_rounds=refine_rounds,
    )


# ---------------------------------------------------------------- the filter


def _allowed(params: RefinedParams, count: int) -> int:
    """Exceedances allowed among `count` checked coordinates (t for the usual q)."""
    if count == params.q:
        return params.max_exceed
    return allowed_exceedances(count, params.coord_rate, params.max_false_rejection)


def _passing(
    clients: Sequence[int], prove: Prover, coords: Tensor, bounds: Bounds, multiplier: float, max_exceed: int
) -> list[int]:
    """The clients whose proof of the statement (coords, centre, multiplier * sigma, max_exceed) succeeds."""
    centre = bounds.centre[coords]
    threshold = bounds.threshold(multiplier)[coords]
    return [i for i in clients if prove(i, coords, centre, threshold, max_exceed)]


# Screening searches each client's pass level over multipliers eta * 2^e, e in this range.
_SEARCH_OCTAVES = (-8.0, 24.0)


def _screen(
    clients: list[int], prove: Prover, coords: Tensor, bounds: Bounds, params: RefinedParams, max_exceed: int
) -> tuple[list[int], float, list[int]]:
    """A phi_max rule: the ceil((1 - phi_max) n) clients that pass at the smallest multipliers (ties by index; zprobe's "at most" differs).

    Passing is monotone in the multiplier, so a bisection per client (on a log scale, one
    statement per client and step) finds the smallest multiplier each passes at: its level.
    Returns (the most central clients, the largest level among them, all clients by level),
    ties broken by client index.
    """
    target = math.ceil((1.0 - params.phi_max) * len(clients) - 1e-9)
    low = dict.fromkeys(clients, _SEARCH_OCTAVES[0])
    high = dict.fromkeys(clients, _SEARCH_OCTAVES[1])
    centre = bounds.centre[coords]
    for _ in range(params.search_steps):
        for i in clients:
            middle = 0.5 * (low[i] + high[i])
            threshold = bounds.threshold(params.eta * 2.0**middle)[coords]
            if prove(i, coords, centre, threshold, max_exceed):
                high[i] = middle
            else:
                low[i] = middle
    ranking = sorted(clients, key=lambda i: (high[i], i))
    screened = ranking[:target]
    return screened, params.eta * 2.0 ** high[screened[-1]], ranking


def refined_filter(
    masked: Sequence[Tensor] | Mapping[int, Tensor],
    clusters: Sequence[Sequence[int]],
    prove: Prover,
    params: RefinedParams,
    seed: int,
    upload: Uploader | None = None,
) -> RefinedResult:
    """One round of the zPROBE filter over clients 0..n-1, seeing only masked vectors, cluster sums and proof bits.

    masked, clusters: the round's secure-aggregation upload (`mask_updates`) and its partition;
    prove: the clients' prover (`make_prover`); upload: fresh secure-aggregation rounds for the
    screening and refinement (`make_uploader`); without it only the single check runs.
    seed: the server's randomness (coordinates, re-clustering).
    """
    members = {i for cluster in clusters for i in cluster}
    n = len(members)
    check_partition(clusters, set(range(n)), "refined_filter")
    generator = torch.Generator().manual_seed(seed)
    bounds = robust_bounds(cluster_sums(masked, clusters), [len(c) for c in clusters])
    dim = bounds.centre.shape[0]
    clients = list(range(n))

    coords = sample_coordinates(dim, params.q, generator)
    if upload is None:
        accepted = _passing(clients, prove, coords, bounds, params.eta, _allowed(params, len(coords)))
        return _result(clients, accepted, bounds, params.eta, coords, clients, float("nan"), 1, 1)

    screen_coords = sample_coordinates(dim, params.screen_q, generator)
    screen_exceed = _allowed(params, len(screen_coords))
    screened, multiplier, ranking = _screen(clients, prove, screen_coords, bounds, params, screen_exceed)
    queries = params.search_steps
    target = math.ceil((1.0 - params.phi_max) * n - 1e-9)
    # A base that changes by no more than the honest clients expected to fail a check is stable.
    tolerance = max(1, math.floor(params.max_false_rejection * n))
    state = _RefineState(clients, prove, params, seed, upload, generator, dim, target, tolerance)
    # Two starts: the most central clients, and the least central ones (at least _MIN_BASE).
    outskirts = ranking[-max(_MIN_BASE, n - len(screened)) :]
    outcomes = [state.run(start) for start in (screened, outskirts) if len(start) >= _MIN_BASE]
    if not outcomes:
        return _result(clients, screened, bounds, params.eta, coords, screened, multiplier, queries, 1)
    eligible = [o for o in outcomes if o.converged and len(o.accepted) >= target]
    if eligible:  # the tightest self-consistent set: the honest majority (see the module docstring)
        best = eligible[0]
        for other in eligible[1:]:
            if _tighter(other.bounds, best.bounds):
                best = other
    else:
        best = max(outcomes, key=lambda o: (o.converged, len(o.accepted)))
    return _result(
        clients,
        best.accepted,
        best.bounds,
        params.eta,
        best.coords,
        screened,
        multiplier,
        queries + state.queries,
        1 + state.rounds,
    )


def _tighter(a: Bounds, b: Bounds) -> bool:
    """Whether a's thresholds are smaller than b's on most coordinates (median ratio below 1)."""
    return bool((a.threshold(1.0) / b.threshold(1.0)).median() < 1.0)


@dataclass(frozen=True)
class _Outcome:
    """Where a refinement ended: accepted clients, the statistics and coordinates of their check."""

    accepted: list[int]
    bounds: Bounds
    coords: Tensor
    converged: bool


# The smallest base the refinement re-clusters: three secure clusters of two. It aims for at
# least _MIN_REFINE_CLUSTERS clusters, since the MAD of fewer means is too noisy to threshold on.
_MIN_BASE = 6
_MIN_REFINE_CLUSTERS = 6


@dataclass
class _RefineState:
    """Refinement from a starting set: statistics of the base -> check everyone -> next base."""

    clients: list[int]
    prove: Prover
    params: RefinedParams
    seed: int
    upload: Uploader
    generator: torch.Generator
    dim: int
    target: int
    tolerance: int
    queries: int = 0
    rounds: int = 0

    def run(self, start: list[int]) -> _Outcome:
        """Refine from `start` for at most refine_rounds rounds, stopping at a fixed point.

        Each round: a fresh secure aggregation of the base in random clusters, the statistics of
        its cluster means, a check of every client at eta. The next base is the accepted set,
        or, when fewer than (1 - phi_max) n were accepted (statistics of an attacker-dominated
        base), the clients it rejected. Converged: the next base equals the current one.
        """
        base, outcome = sorted(start), None
        for _ in range(self.params.refine_rounds):
            if len(base) < _MIN_BASE:
                break
            size = max(2, min(self.params.cluster_size, len(base) // _MIN_REFINE_CLUSTERS))
            self.rounds += 1
            order = random_clusters(len(base), len(base) // size, protocol_seed(self.seed, self.rounds))
            partition = [[base[k] for k in part] for part in order]
            bounds = robust_bounds(cluster_sums(self.upload(partition), partition), [len(p) for p in partition])
            coords = sample_coordinates(self.dim, self.params.q, self.generator)
            accepted = _passing(self.clients, self.prove, coords, bounds, self.params.eta, _allowed(self.params, len(coords)))
            self.queries += 1
            kept = set(accepted)
            following = accepted if len(accepted) >= self.target else [i for i in self.clients if i not in kept]
            changed = len(set(following) ^ set(base))
            outcome = _Outcome(accepted, bounds, coords, converged=changed <= self.tolerance)
            if outcome.converged:
                break
            base = following
        if outcome is None:
            raise ValueError(f"refinement needs a base of at least {_MIN_BASE} clients")
        return outcome


def _result(
    clients: list[int],
    accepted: list[int],
    bounds: Bounds,
    eta: float,
    coords: Tensor,
    screened: list[int],
    multiplier: float,
    queries: int,
    rounds: int,
) -> RefinedResult:
    kept = set(accepted)
    return RefinedResult(
        accepted=sorted(kept),
        rejected=[i for i in clients if i not in kept],
        centre=bounds.centre,
        threshold=bounds.threshold(eta),
        coords=coords,
        screened=sorted(screened),
        screen_multiplier=multiplier,
        queries=queries,
        aggregation_rounds=rounds,
    )


def simulate_round(updates: Sequence[Tensor], params: RefinedParams, seed: int, refine: bool = True) -> RefinedResult:
    """The whole filter for one round of updates (client i = updates[i]), as the Flower wiring calls it.

    Clusters the clients, masks their updates, and runs `refined_filter` with a prover and (when
    `refine`) an uploader over the updates; the filter itself sees only masked vectors, cluster
    sums and proof bits. All randomness derives from `seed`.
    """
    clusters = random_clusters(len(updates), params.clusters, protocol_seed(seed, 0))
    masked = mask_updates(updates, clusters, protocol_seed(seed, -1))
    upload = make_uploader(updates, protocol_seed(seed, -2)) if refine else None
    return refined_filter(masked, clusters, make_prover(updates), params, seed, upload)


# --- Defence ---
class ZProbeRefinedDefence(Defence):
    """The screening-and-refinement filter (not the paper's zPROBE: see the module docstring).

    Parameters come from `default_parameters(n, phi_max)` for each round's n replies, which
    needs at least 3 clusters of 3.
    """

    name = "zprobe_refined"
    description = "zPROBE extension: MAD bounds, t of q may exceed, Chebyshev eta, screening + refinement (several secure rounds)"
    min_clients = 9

    def screen(self, updates: Tensor, weights: Tensor, seed: int) -> Screening:
        """The clients that passed, with the filter's public statistics."""
        params = default_parameters(updates.shape[0], self.phi_max)
        result = simulate_round(list(updates), params, seed)
        return Screening(kept=result.accepted, stats=result.summary())
