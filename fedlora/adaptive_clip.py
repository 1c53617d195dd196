"""Adaptive clipping for user-level DP (Andrew et al. 2021, "Differentially Private Learning with
Adaptive Clipping", NeurIPS 2021, Algorithm 1 with the geometric update).

`privacy.adaptive_clip = true` lets user-level DP's clip norm C follow a quantile of the clients'
update norms instead of staying at `privacy.user_clip` (which becomes C_0). Each round t, with
the round's accepted updates u_k clipped to C_t (fedlora/user_privacy.py):

1. The server computes each accepted update's bit b_k = 1[||u_k|| <= C_t] from the update itself:
   nothing a client says about its norm is used. A sampled client whose reply is missing or
   refused adds 0 to the centred count below, which is what a bit of 1/2 would add: with a share r
   of the sampled clients replying, b~ tends to r f + (1 - r) / 2 for an unclipped fraction f, so
   the clip settles where f = (gamma - (1 - r) / 2) / r: unbiased for gamma = 1/2, otherwise pulled
   towards the median (and for gamma above (1 + r) / 2 out of reach: the clip then grows until the
   bound of step 4). The round's `sampled` and `accepted` figures give r.
2. The count is centred and noised: sum_k (b_k - 1/2) + N(0, sigma_b^2). Centring makes one user's
   contribution 1/2 in absolute value, so under add/remove adjacency (the accountant's, with Poisson
   sampling) the count's sensitivity is 1/2 and its noise multiplier 2 sigma_b; an uncentred count
   would have sensitivity 1 and multiplier sigma_b.
3. The fraction unclipped is estimated with the fixed denominator q N, as the update's mean is:
   b~ = centred noised count / (q N) + 1/2, clamped to [0, 1] (post-processing: it bounds a round's
   change of C to a factor exp(eta)). The round size m is random (Poisson sampling), which adds
   variance (1 - q) / (4 q N) to b~ besides the count's noise: at q N = 3 and q = 1/2, a standard
   deviation of 0.2.
4. C_{t+1} = C_t exp(-eta (b~ - gamma)), for the target quantile gamma (`clip_quantile`) and the
   learning rate eta (`clip_lr`): too many updates unclipped (b~ > gamma) shrinks C, too few grows it.
   The paper's defaults: gamma = 0.5, eta = 0.2, sigma_b = q N / 20 (`clip_count_noise`). C stays
   within C_0 / CLIP_RANGE and C_0 CLIP_RANGE (ours, post-processing): without a bound a clip that
   shrinks to 0 stays there (0 exp(x) = 0) and one that overflows makes the noise infinite.

Privacy. A round releases two Gaussian mechanisms on the same sampled users: the update sum with
noise multiplier z_Delta (std z_Delta C_t, sensitivity C_t) and the count with multiplier 2 sigma_b.
Together they are one Gaussian mechanism of multiplier z = (z_Delta^-2 + (2 sigma_b)^-2)^(-1/2)
(the paper's Theorem 1, sec. 3). So the accountant runs on z exactly as with a fixed clip: sigma is
calibrated to z from (epsilon, delta, rounds, q), and the update's noise is the rest,
z_Delta = (z^-2 - (2 sigma_b)^-2)^(-1/2), which exists only when 2 sigma_b > z; otherwise the
count's noise alone would spend more than the budget allows and the run is refused in one line.
C_t itself is public (the history records it): it is computed from released values only.

Distributed noise is refused (fedlora/config.py). The server sees only noised replies there (the
noise share's norm dwarfs C), so it cannot compute the bits; the alternative, each client sending
its own bit noised with a share of sigma_b, would make the bit a claim the server cannot check, and
a lying client could steer everyone's clip norm.

Flower's DifferentialPrivacyServerSideAdaptiveClipping (1.41) was read for comparison: it counts the
updates that *were* clipped, uncentred, divided by the replies received, yet applies the paper's
update sign meant for the unclipped fraction, so its C runs away from the quantile; this module
follows the paper.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedlora.config import ExperimentConfig
from fedlora.privacy import PrivacyBudgetError

# The paper's default count noise: sigma_b = expected round size / COUNT_NOISE_DIVISOR.
COUNT_NOISE_DIVISOR = 20.0
# How far the clip may move from C_0 either way (a factor): far beyond any update norm's range.
CLIP_RANGE = 1e6


def combined_noise_multiplier(update_multiplier: float, count_noise: float) -> float:
    """z: the one Gaussian mechanism's multiplier that the update's (z_Delta) and the centred
    count's (2 sigma_b) together amount to, (z_Delta^-2 + (2 sigma_b)^-2)^(-1/2)."""
    return (update_multiplier**-2 + (2.0 * count_noise) ** -2) ** -0.5


@dataclass(frozen=True)
class AdaptiveClip:
    """The quantile estimator's fixed parameters: target quantile gamma, learning rate eta, count noise sigma_b."""

    quantile: float
    lr: float
    count_noise: float

    @classmethod
    def from_config(cls, config: ExperimentConfig) -> AdaptiveClip | None:
        """From privacy.adaptive_clip and its keys; None when the clip stays fixed."""
        privacy = config.privacy
        if not privacy.adaptive_clip:
            return None
        count_noise = privacy.clip_count_noise
        if count_noise is None:
            count_noise = config.federation.clients_per_round / COUNT_NOISE_DIVISOR
        return cls(privacy.clip_quantile, privacy.clip_lr, count_noise)

    def update_noise_multiplier(self, calibrated: float) -> float:
        """z_Delta for a calibrated z: what is left for the update once the count has its share
        (PrivacyBudgetError, one line, when the count's noise alone is too little: 2 sigma_b <= z)."""
        if 2.0 * self.count_noise <= calibrated:
            raise PrivacyBudgetError(
                f"privacy.clip_count_noise: {self.count_noise:g} on the count of unclipped updates is too little for "
                f"the calibrated noise multiplier {calibrated:.4g}, which needs it above {calibrated / 2:.4g} (the count "
                f"alone would spend the budget); set clip_count_noise above {calibrated / 2:.4g}, raise privacy.epsilon, "
                "or set privacy.adaptive_clip = false"
            )
        return (calibrated**-2 - (2.0 * self.count_noise) ** -2) ** -0.5

    def unclipped_fraction(self, centred_count: float, count_noise: float, expected_clients: float) -> float:
        """b~: the noised centred count over q N, shifted back by 1/2, within [0, 1]."""
        return min(1.0, max(0.0, (centred_count + count_noise) / expected_clients + 0.5))

    def next_clip(self, clip: float, unclipped_fraction: float, initial: float) -> float:
        """C_{t+1} = C_t exp(-eta (b~ - gamma)), kept within a factor CLIP_RANGE of C_0 = `initial`."""
        moved = clip * math.exp(-self.lr * (unclipped_fraction - self.quantile))
        return min(initial * CLIP_RANGE, max(initial / CLIP_RANGE, moved))


def centred_count(norms: list[float], clip: float) -> float:
    """sum_k (1[||u_k|| <= C] - 1/2) over the accepted updates' norms, computed by the server."""
    return sum((1.0 if norm <= clip else 0.0) - 0.5 for norm in norms)
