"""User-level differential privacy: DP-FedAvg (McMahan et al. 2018) accounted by Opacus.

`privacy.unit = "user"` protects one client's whole contribution to the run, where DP-SGD
(`"example"`, fedlora/privacy.py) protects one example of a client. Clients train without
DP-SGD; the server's aggregation is the private mechanism. Each round:

1. Sampling. Every eligible client is sampled independently with probability
   q = clients_per_round / N (Poisson sampling, N the clients that passed the handshake), the
   accountant's assumption. The round size m is therefore Binomial(N, q): it varies around
   clients_per_round and can be 0. A round with no sampled client still takes its step, the
   noise alone: skipping it would tell an observer that nobody was sampled, which the Gaussian
   mechanism's analysis does not cover (and the accountant counts every round anyway).
2. Clipping. Each accepted update u_k (the change of the factors the strategy's clients train,
   and of the head when it is trained, as one vector) is clipped by the server to norm S
   (`privacy.user_clip`): u_k * min(1, S / ||u_k||). The server never trusts a client's claim
   of having clipped. A sampled client whose reply is missing or refused contributes zero.
3. Noise. Gaussian N(0, sigma^2 S^2) per coordinate on the sum of the clipped updates:
   - `privacy.noise = "central"`: the server adds all of it (trust: an honest server that sees
     individual updates and keeps them to itself);
   - `"distributed"`: each of the round's m clients clips its own update and adds
     N(0, sigma^2 S^2 / m), so that a secure aggregation would reveal only the noised sum (trust:
     an honest-but-curious server and clients that add their share). The server adds the shares
     of sampled clients whose reply is missing or refused (all of it when m = 0), so the sum it
     releases always carries sigma^2 S^2. What this means for the noise, stated:
     * the server cannot clip a noised reply to S: the share's norm is about
       sigma S sqrt(d / m) >> S, and clipping it to S would remove the noise. It clips to
       `honest_share_bound` instead (S plus the share's norm bound, exceeded by an honest reply
       with probability < HONEST_TAIL), which leaves an honest reply untouched and bounds a
       dishonest one, but only to that bound, not to S;
     * so in distributed mode a client's own clipping is what makes its sensitivity S. A client
       that skips clipping weakens only its own guarantee (and can bias the model, up to the
       bound); one that withholds its noise share would weaken everyone's: with h of the m
       shares present the sum's noise variance is (h / m) sigma^2 S^2. So a reply whose norm is
       below `honest_share_floor` (what an honest noised reply stays above except with
       probability < HONEST_TAIL) counts as a missing share: the server tops it up, and the
       round's figures name it (`noise_withheld`). A client that adds only part of its share
       can still slip under that test; the sum the server itself sees before its top-up carries
       only the arrived shares' variance. The history records the shares that arrived.
4. Estimator. The noised sum is divided by the expected round size q N (= clients_per_round):
   the fixed-denominator estimator, unbiased for the mean update and with sensitivity S / (q N)
   whatever m turns out to be (dividing by the realized m would make the denominator, and so
   the sensitivity, depend on who was sampled). Every clipped update has the same weight:
   the declared example counts (`federation.weighting`) do not enter user-level aggregation.
5. The strategy's own rule then runs on the private mean as if it were one client's update
   (FedIT, FFA-LoRA, RoLoRA, LoRA-A2, FedSA-LoRA's A: it is the new factor; FedSVD refactorizes
   the noised B), which is post-processing at no privacy cost. Strategies whose aggregation is not
   such a mean, or that do not declare their own `user_level_dp` (strategies/base.py), are refused.
6. Adaptive clipping (`privacy.adaptive_clip`, central noise only; fedlora/adaptive_clip.py): the
   server counts the accepted updates its clip S = C_t left unclipped, noises the count and moves
   C_{t+1} towards the `clip_quantile` of the update norms (Andrew et al. 2021). The noise on the
   sum is then z_Delta C_t, with z_Delta the share of the calibrated sigma the count leaves; C_t is
   part of the server's state (checkpointed) and every round's figures (`user_clip`).

sigma is calibrated once, before anything starts, from (epsilon, delta, rounds, q) with Opacus'
accountant (`fedlora.privacy.calibrate_noise`: the same search, PRV or RDP), for every round of
the run; a target it cannot meet is refused in one line (under adaptive clipping sigma is the
update's and the count's noise together, and the accountant runs on it). The ledger charges one
round per round the server runs (and the round a killed server left in flight), and the user-level
epsilon is Opacus' for ((sigma, q, rounds so far)); a resumed run goes on from the checkpoint's
ledger (and clip).

What the guarantee covers: the global adapter the server releases each round, and everything
computed from it. The run directory's history is the trusted server's log: it names who was
sampled, their training losses and how many updates were clipped, which the guarantee does not
cover.

Where the randomness comes from (`privacy.secret_noise`). Seeded (the simulation's default): the
server's noise, its Poisson sampling and the clients' noise shares are drawn from seeds derived
from the run's seed, so that a run reproduces; but the seed is public (config.json, the model
card, every SuperNode's run config), and anyone holding it can regenerate the noise and subtract
it: no privacy against them, which summary.json and the model card say. Secret: all of it comes
from the operating system's entropy (`secrets`), never reproduced; the server tells the clients
to draw their shares so (`SECRET_KEY`). A `flwr run` deployment turns it on unless its experiment
sets it (fedlora/server_app.py).
"""

from __future__ import annotations

import math
import random
import secrets
from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import ConfigRecord

from fedlora.adaptive_clip import AdaptiveClip, centred_count
from fedlora.config import ExperimentConfig
from fedlora.lora import LoraState
from fedlora.privacy import BUDGET_SLACK, PrivacyBudgetError, calibrate_noise, epsilon_of
from fedlora.seeds import derive_seed

# A distributed-noise client's instruction (train config entries).
CLIP_KEY = "udp-clip"
SHARE_STD_KEY = "udp-noise-std"
SECRET_KEY = "udp-secret"  # draw the share from the OS's entropy, not from the run's seed
SEEDED_NOISE = "noise reproducible from the run seed: not private against anyone holding the seed"
SECRET_NOISE = "noise, sampling and shares from the operating system's entropy: not reproducible"
# The probability that an honest client's noised reply exceeds the server's clipping bound
# (or falls below its floor), and the deviations of the noise's norm, in share std, that it allows:
# P(| ||z|| - E||z|| | >= std t) <= exp(-t^2 / 2) (Gaussian concentration of a 1-Lipschitz function).
HONEST_TAIL = 1e-12
HONEST_DEVIATIONS = math.sqrt(2.0 * math.log(1.0 / HONEST_TAIL))  # t ~ 7.43
USER_LEVEL_REMEDY = "run fewer rounds, sample fewer clients a round, or federate more clients"


def group_privacy(epsilon: float, delta: float, group: int) -> tuple[float, float]:
    """The (epsilon, delta) an (epsilon, delta)-DP mechanism gives a group of `group` records:
    (k epsilon, k e^((k-1) epsilon) delta), the conservative textbook conversion (Dwork and Roth,
    Thm 2.2 generalized; Charles et al. 2024 account example-level sampling at the user level more
    tightly). Applied to a client's k examples, it turns example-level DP-SGD's guarantee into a
    user-level one."""
    return group * epsilon, group * math.exp((group - 1) * epsilon) * delta


def noise_source(secret: bool) -> str:
    """Where user-level DP's randomness comes from, in words (summary.json, the model card)."""
    return SECRET_NOISE if secret else SEEDED_NOISE


def poisson_sample(clients: list[int], rate: float, seed: int, server_round: int, secret: bool = False) -> list[int]:
    """Each client independently with probability `rate`, drawn from (seed, round), or from the OS's
    entropy when `secret`: a round of any size, 0 included."""
    rng = random.SystemRandom() if secret else random.Random(f"{seed}:user-dp-sampling:{server_round}")
    return [client for client in clients if rng.random() < rate]


def clip_to_norm(vector: torch.Tensor, bound: float) -> torch.Tensor:
    """`vector` scaled down to L2 norm `bound` if longer (float64); unchanged otherwise."""
    vector = vector.to(torch.float64)
    norm = float(torch.linalg.vector_norm(vector))
    return vector * (bound / norm) if norm > bound else vector


def gaussian(size: int, std: float, seed: int | None) -> torch.Tensor:
    """`size` independent N(0, std^2) draws in float64, from `seed` (None: a secret seed from the OS's entropy)."""
    generator = torch.Generator().manual_seed(secrets.randbits(63) if seed is None else seed)
    return torch.randn(size, dtype=torch.float64, generator=generator) * std


def honest_share_bound(clip: float, share_std: float, size: int) -> float:
    """A norm an honest distributed-noise reply (clipped to `clip`, plus N(0, share_std^2) on `size`
    coordinates) exceeds with probability below HONEST_TAIL: clip + share_std (sqrt(size) + t),
    since E||z|| <= share_std sqrt(size)."""
    return clip + share_std * (math.sqrt(size) + HONEST_DEVIATIONS)


def honest_share_floor(clip: float, share_std: float, size: int) -> float:
    """A norm an honest distributed-noise reply stays above except with probability below HONEST_TAIL:
    share_std (size / sqrt(size + 1) - t) - clip, since E||z|| >= share_std size / sqrt(size + 1) and
    the clipped change moves the noise by at most `clip` (0 or less: no reply can be told apart)."""
    return share_std * (size / math.sqrt(size + 1) - HONEST_DEVIATIONS) - clip


def delta_vector(state: LoraState, reference: LoraState) -> torch.Tensor:
    """A reply's change from the state it trained from, over the tensors it holds, as one float64 vector."""
    return state.minus(reference).flatten().to(torch.float64)


@dataclass(frozen=True)
class ShareInstruction:
    """What a distributed-noise client does to its update before replying: clip to `clip`, add N(0, std^2)
    (drawn from the OS's entropy when `secret`, else from the seed it is given)."""

    clip: float
    std: float
    secret: bool = False

    @classmethod
    def from_config(cls, config: ConfigRecord | dict) -> ShareInstruction | None:
        """Read from a train config; None when the round asks for no client-side noise."""
        if CLIP_KEY not in config:
            return None
        return cls(float(config[CLIP_KEY]), float(config[SHARE_STD_KEY]), bool(config.get(SECRET_KEY, False)))

    def apply(self, trained: LoraState, broadcast: LoraState, seed: int) -> LoraState:
        """The reply's state: broadcast + clip(trained - broadcast) + noise, over the trained tensors."""
        change = clip_to_norm(delta_vector(trained, broadcast), self.clip)
        noised = change + gaussian(change.numel(), self.std, None if self.secret else seed)
        return broadcast.plus(trained.unflatten(noised))


@dataclass(frozen=True)
class UserLevelSettings:
    """The mechanism's fixed parameters for a run."""

    epsilon: float
    delta: float
    clip: float
    noise: str  # "central" | "distributed"
    accountant: str
    rounds: int  # the rounds sigma is calibrated for
    clients_per_round: int
    population: int  # N: the clients that can be sampled
    secret: bool = False  # privacy.secret_noise: randomness from the OS's entropy, not the run's seed
    adaptive: AdaptiveClip | None = None  # privacy.adaptive_clip: clip is then the first round's

    @classmethod
    def from_config(cls, config: ExperimentConfig, population: int) -> UserLevelSettings:
        """From the experiment and the federation's size."""
        privacy, federation = config.privacy, config.federation
        return cls(
            privacy.epsilon,
            privacy.delta,
            privacy.user_clip,
            privacy.noise,
            privacy.accountant,
            federation.rounds,
            federation.clients_per_round,
            population,
            privacy.secret_noise,
            AdaptiveClip.from_config(config),
        )

    @property
    def sample_rate(self) -> float:
        """q = clients_per_round / N."""
        return self.clients_per_round / self.population

    @property
    def expected_clients(self) -> float:
        """q N: the fixed denominator of the estimator."""
        return self.sample_rate * self.population

    def check_population(self) -> None:
        """Refuse a federation too small for the plan: more clients a round than can be sampled (q > 1),
        or a delta that is no privacy for N users (delta well below 1 / N)."""
        if self.clients_per_round > self.population:
            raise PrivacyBudgetError(
                f"federation.clients_per_round: {self.clients_per_round} clients a round but only {self.population} can be "
                f"sampled (those that passed the handshake), a sampling rate above 1; lower clients_per_round to at most "
                f"{self.population} or bring more clients"
            )
        if self.delta >= 1.0 / self.population:
            raise PrivacyBudgetError(
                f"privacy.delta: {self.delta:g} is at least 1/N = 1/{self.population} for {self.population} users, which lets "
                f"the mechanism reveal whole users; use a delta well below {1.0 / self.population:.2g}"
            )

    def calibrate(self) -> float:
        """sigma that spends just under epsilon over every round at q (PrivacyBudgetError, one line, if none can,
        or if adaptive clipping's count noise leaves the update no share of it)."""
        self.check_population()
        sigma = calibrate_noise(self.accountant, self.epsilon, self.delta, self.sample_rate, self.rounds, USER_LEVEL_REMEDY)
        self.update_noise_multiplier(sigma)
        return sigma

    def update_noise_multiplier(self, sigma: float) -> float:
        """The multiplier of the noise on the update sum: sigma, or under adaptive clipping its share z_Delta."""
        return sigma if self.adaptive is None else self.adaptive.update_noise_multiplier(sigma)


class UserLevelPrivacy:
    """The server's user-level mechanism (sampling, clipping, noise, estimator, adaptive clip) and its ledger."""

    def __init__(
        self, settings: UserLevelSettings, noise_multiplier: float, rounds_charged: int = 0, clip: float | None = None
    ) -> None:
        self.settings = settings
        self.noise_multiplier = noise_multiplier  # what the accountant charges (adaptive: the update's and count's together)
        self.update_noise_multiplier = settings.update_noise_multiplier(noise_multiplier)
        self.rounds_charged = rounds_charged
        self.clip = settings.clip if clip is None else clip  # S this round (adaptive: C_t)

    @classmethod
    def for_run(cls, config: ExperimentConfig, population: int) -> UserLevelPrivacy:
        """Calibrated for the run's rounds at q = clients_per_round / population."""
        settings = UserLevelSettings.from_config(config, population)
        return cls(settings, settings.calibrate())

    @property
    def noise_std(self) -> float:
        """sigma S: the standard deviation of the noise on the sum, per coordinate (adaptive: z_Delta C_t)."""
        return self.update_noise_multiplier * self.clip

    # --- each round ---------------------------------------------------------------------
    def sample(self, clients: list[int], seed: int, server_round: int) -> list[int]:
        """This round's clients, by Poisson sampling at q."""
        return poisson_sample(clients, self.settings.sample_rate, seed, server_round, self.settings.secret)

    def client_instruction(self, sampled: int) -> dict[str, float]:
        """Train config entries for the round's clients: their clip and noise share (distributed), else none."""
        if self.settings.noise != "distributed" or sampled == 0:
            return {}
        return {CLIP_KEY: self.clip, SHARE_STD_KEY: self.share_std(sampled), SECRET_KEY: self.settings.secret}

    def share_std(self, sampled: int) -> float:
        """Each of the round's m clients' noise share's std under distributed noise: sigma S / sqrt(m)."""
        return self.noise_std / math.sqrt(sampled)

    def server_clip(self, sampled: int, size: int) -> float:
        """The norm the server clips every reply to: S, or under distributed noise the bound an honest noised reply keeps."""
        if self.settings.noise == "central":
            return self.clip
        return honest_share_bound(self.clip, self.share_std(sampled), size)

    def share_floor(self, sampled: int, size: int) -> float:
        """The norm below which a reply has withheld its noise share (distributed noise; else none)."""
        if self.settings.noise == "central" or sampled == 0:
            return -math.inf
        return honest_share_floor(self.clip, self.share_std(sampled), size)

    def privatize(self, changes: list[torch.Tensor], sampled: int, size: int, seed: int) -> tuple[torch.Tensor, dict[str, Any]]:
        """The private mean change: (sum of the clipped changes + the server's noise) / (q N), and the round's figures.

        `changes` are the accepted replies' changes (each a vector of `size` values), `sampled` the
        round's m, `seed` the noise's (unused under secret noise); the server's noise is all of sigma^2 S^2 (central) or the shares that did not
        arrive or were withheld (distributed: `noise_withheld`, the positions in `changes` of replies
        too short to carry theirs).
        """
        bound = self.server_clip(sampled, size) if changes else self.clip
        floor = self.share_floor(sampled, size)
        total = torch.zeros(size, dtype=torch.float64)
        norms, withheld = [], []
        for position, change in enumerate(changes):
            norms.append(float(torch.linalg.vector_norm(change)))
            if norms[-1] < floor:
                withheld.append(position)
            total += clip_to_norm(change, bound)
        shares = len(changes) - len(withheld) if self.settings.noise == "distributed" else 0
        missing = 1.0 if sampled == 0 else 1.0 - shares / sampled
        server_std = self.noise_std * math.sqrt(missing)
        if server_std > 0:
            total += gaussian(size, server_std, None if self.settings.secret else seed)
        figures = {
            "sampled": sampled,
            "summed": len(changes),
            "clipped": sum(norm > bound for norm in norms),
            "user_clip": self.clip,
            "clip_bound": bound,
            "noise_std": self.noise_std,
            "server_noise_std": server_std,
            "denominator": self.settings.expected_clients,
        }
        if self.settings.noise == "distributed":
            figures["noise_shares"] = shares
            figures["noise_withheld"] = withheld
        if self.settings.adaptive is not None:
            figures.update(self.adapt_clip(norms, seed))
        return total / self.settings.expected_clients, figures

    def adapt_clip(self, norms: list[float], seed: int) -> dict[str, float]:
        """Move the clip towards the target quantile of `norms` (the accepted updates' norms, as the server
        measured them) from their noised centred count; the released fraction and the next clip."""
        adaptive = self.settings.adaptive
        count_seed = None if self.settings.secret else derive_seed(seed, "adaptive-clip-count")
        noise = float(gaussian(1, adaptive.count_noise, count_seed))
        fraction = adaptive.unclipped_fraction(centred_count(norms, self.clip), noise, self.settings.expected_clients)
        self.clip = adaptive.next_clip(self.clip, fraction, self.settings.clip)
        return {"unclipped_fraction": fraction, "next_clip": self.clip}

    def charge(self) -> None:
        """Count one more round of the mechanism."""
        self.rounds_charged += 1

    # --- figures ------------------------------------------------------------------------
    def epsilon(self, extra_rounds: int = 0) -> float:
        """The user-level epsilon after the rounds charged (and `extra_rounds` more), by Opacus' accountant."""
        rounds = self.rounds_charged + extra_rounds
        if rounds == 0:
            return 0.0
        history = ((self.noise_multiplier, self.settings.sample_rate, rounds),)
        return epsilon_of(self.settings.accountant, history, self.settings.delta)

    def can_afford_round(self) -> bool:
        """Whether one more round keeps the release within epsilon."""
        return self.epsilon(1) <= self.settings.epsilon + BUDGET_SLACK

    def trust(self) -> str:
        """The trust the guarantee assumes, in words."""
        if self.settings.noise == "central":
            return "central noise: an honest server that sees each client's update and keeps it to itself"
        return (
            "distributed noise: each client clips its update and adds its noise share; an honest-but-curious server "
            "that sees only the noised sum (secure aggregation); clients that withhold their share weaken everyone's guarantee"
        )

    def summary(self) -> dict[str, Any]:
        """summary.json's user_privacy section."""
        settings = self.settings
        return {
            "unit": "user",
            "noise": settings.noise,
            "trust": self.trust(),
            "noise_source": noise_source(settings.secret),
            "estimator": f"fixed denominator: the noised sum / q N = {settings.expected_clients:g}",
            "weights": "equal: every clipped update counts once",
            "accountant": settings.accountant,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": settings.sample_rate,
            "clip": self.clip,  # adaptive: the clip the next round would use, C_{T+1}
            "adaptive_clip": self.adaptive_summary(),
            "rounds": self.rounds_charged,
            "epsilon": self.epsilon(),
            "epsilon_target": settings.epsilon,
            "delta": settings.delta,
        }

    def adaptive_summary(self) -> dict[str, float] | None:
        """The adaptive clip's parameters, first clip and the update's share of the noise; None for a fixed clip."""
        adaptive = self.settings.adaptive
        if adaptive is None:
            return None
        return {
            "quantile": adaptive.quantile,
            "lr": adaptive.lr,
            "count_noise": adaptive.count_noise,
            "initial_clip": self.settings.clip,
            "update_noise_multiplier": self.update_noise_multiplier,
        }

    # --- checkpoint ---------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps: the calibrated noise, the population, the rounds charged and the clip."""
        return {
            "unit": "user",
            "noise_multiplier": self.noise_multiplier,
            "population": self.settings.population,
            "rounds_charged": self.rounds_charged,
            "clip": self.clip,
        }

    @classmethod
    def from_state(cls, config: ExperimentConfig, state: dict[str, Any]) -> UserLevelPrivacy:
        """The mechanism and ledger as a checkpoint kept them (no recalibration: the plan is part of the run)."""
        settings = UserLevelSettings.from_config(config, int(state["population"]))
        clip = state.get("clip", settings.clip)  # a checkpoint from before adaptive clipping: the fixed clip
        return cls(settings, float(state["noise_multiplier"]), int(state["rounds_charged"]), float(clip))
