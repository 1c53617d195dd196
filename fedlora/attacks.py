"""Simulated Byzantine clients: model-poisoning attacks on updates, and label flipping.

An *update* is a 1-D float tensor: a client's change of the LoRA factors it trained, flattened.
A model-poisoning attack is a pure function

    attack(honest, own, generator, **params) -> malicious

- `honest` (n_honest x dim): the honest clients' updates of the round. The adversary is assumed
  to know them (omniscient adversary, as ALIE, IPM and min-max assume in their papers);
- `own` (n_malicious x dim): the updates the malicious clients trained honestly on their data;
- `generator`: the only source of randomness (only `gaussian_noise` draws from it);
- returns the n_malicious x dim updates the malicious clients send instead.

Attacks (`MODEL_ATTACKS`, by name):
- `sign_flip`: -scale * own.
- `scaling`: factor * own (boosting). `factor = "round_size"` scales by the round's number of
  clients n, the model-replacement boost of Bagdasaryan et al. 2020 (gamma = n / eta with a
  server learning rate of 1; Bhagoji et al. 2019 boost likewise by n / m). The zPROBE paper's
  own factor could not be read from the sources at hand (they hold its abstract only); the
  default stays 10.
- `gaussian_noise`: own + N(0, sigma^2) per coordinate (sigma absolute, in update units).
- `alie` ("a little is enough", Baruch et al. 2019): mean - z * std of the honest updates, per
  coordinate; by default z = Phi^-1((n - s) / n) with s = floor(n / 2 + 1) - m, n = all clients,
  m = malicious ones: the largest shift for which the attackers still look like the majority.
- `non_omniscient` (the zPROBE paper's third attack): mu - kappa * sigma per coordinate, mu and
  sigma estimated from the malicious clients' own honestly trained updates only (an adversary
  that does not see the honest clients); kappa defaults to 1, as in the zPROBE paper's grid.
- `ipm` (inner-product manipulation, Xie et al. 2019): -eps * mean of the honest updates.
- `min_max` (Shejwalkar & Houmansadr 2021): mean + gamma * p with p = -std (or -mean/||mean||,
  -sign(mean), -mean) and gamma the largest value, found by bisection, such that the malicious
  update is no farther from any honest update than the two farthest honest updates are apart.
- `adaptive`: mean + gamma * p like min-max, but gamma is the largest for which the round's
  defence still keeps every malicious client (an adversary that knows the decision rule and
  stays just inside it; see `adaptive`). p = -mean by default (gamma = 2 sends the sign-flipped
  mean), or -std (ALIE's direction), -mean / ||mean||, -sign(mean). Besides the three inputs it
  takes a fourth, `accepts` (the defence's verdict on a candidate), which `Adversary` supplies.

All malicious clients of `alie`, `non_omniscient`, `ipm`, `min_max` and `adaptive` send the same vector (the
attacks are coordinated). `apply_model_attack` looks an attack up by name and checks its parameters.

Label flipping is data poisoning and happens before training: `flip_labels` maps y to
num_classes - 1 - y. Which clients are malicious is fixed for the whole run by
`choose_malicious(num_clients, fraction, seed)`.

`Adversary` is the simulated adversary of one run: it knows who is malicious, tells those
clients to flip their labels (data poisoning) or rewrites their updates (model poisoning)
before the server's defence sees them; for `adaptive` the server hands it the round's defence
and weights (`rewrite`). Only the run's records read who was malicious.

An attack from outside the package (`model_attack`; fedlora/plugins.py, docs/extending.md): a
function of the signature above, its options keyword-only, named by import path
("package.module:function") or as an entry point in the group fedlora.attacks.
"""

from __future__ import annotations

import inspect
import math
import random
from collections.abc import Callable, Mapping
from statistics import NormalDist
from typing import Any, Protocol

import torch
from torch import Tensor

from fedlora.plugins import PluginError, load_plugin
from fedlora.seeds import derive_seed

ModelAttack = Callable[..., Tensor]


def _check_inputs(name: str, honest: Tensor, own: Tensor, min_honest: int = 0) -> None:
    """Raise ValueError unless honest (n_h x dim) and own (n_m x dim) are float 2-D, same dim."""
    for label, t in (("honest", honest), ("own", own)):
        if t.ndim != 2:
            raise ValueError(f"{name}: {label} updates must be 2-D (clients x dim), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{name}: {label} updates must be a float tensor, got {t.dtype}")
    if honest.shape[1] != own.shape[1]:
        raise ValueError(f"{name}: honest updates have dim {honest.shape[1]} but own updates dim {own.shape[1]}")
    if honest.shape[0] < min_honest:
        raise ValueError(f"{name}: needs at least {min_honest} honest updates, got {honest.shape[0]}")


def _check_finite(name: str, **values: float) -> None:
    """Raise ValueError for a non-finite parameter."""
    for key, value in values.items():
        if not math.isfinite(value):
            raise ValueError(f"{name}: {key} must be a finite number, got {value!r}")


def _coordinated(vector: Tensor, own: Tensor) -> Tensor:
    """The same malicious vector for every malicious client (n_m x dim), in own's dtype."""
    return vector.to(own.dtype).expand(own.shape[0], -1).clone()


def sign_flip(honest: Tensor, own: Tensor, generator: torch.Generator | None = None, *, scale: float = 1.0) -> Tensor:
    """Each malicious client sends its own update negated and scaled: -scale * own."""
    _check_inputs("sign_flip", honest, own)
    _check_finite("sign_flip", scale=scale)
    if scale <= 0:
        raise ValueError(f"sign_flip: scale must be > 0, got {scale}")
    return -scale * own


# `scaling` with this factor boosts by the round's number of clients (model replacement).
MODEL_REPLACEMENT = "round_size"


def scaling(honest: Tensor, own: Tensor, generator: torch.Generator | None = None, *, factor: float | str = 10.0) -> Tensor:
    """Each malicious client sends its own update multiplied by `factor` ("round_size": by n, all clients of the round)."""
    _check_inputs("scaling", honest, own)
    if isinstance(factor, str):
        if factor != MODEL_REPLACEMENT:
            raise ValueError(f"scaling: factor must be a number or {MODEL_REPLACEMENT!r}, got {factor!r}")
        factor = float(honest.shape[0] + own.shape[0])
    _check_finite("scaling", factor=factor)
    if factor == 0:
        raise ValueError("scaling: factor must be nonzero (0 would send an empty update)")
    return factor * own


def gaussian_noise(honest: Tensor, own: Tensor, generator: torch.Generator | None = None, *, sigma: float = 1.0) -> Tensor:
    """Each malicious client adds N(0, sigma^2) noise to every coordinate of its own update."""
    _check_inputs("gaussian_noise", honest, own)
    _check_finite("gaussian_noise", sigma=sigma)
    if sigma < 0:
        raise ValueError(f"gaussian_noise: sigma must be >= 0, got {sigma}")
    if generator is None:
        raise ValueError("gaussian_noise: needs a torch.Generator (every random choice is seeded)")
    noise = torch.randn(own.shape, generator=generator, dtype=own.dtype, device=own.device)
    return own + sigma * noise


def alie_z(num_clients: int, num_malicious: int) -> float:
    """ALIE's default z for n clients of which m are malicious: Phi^-1((n - s) / n), s = floor(n/2 + 1) - m.

    s is how many honest clients the attackers must still win over to form a majority; the
    attack moves each coordinate by z standard deviations, the largest shift for which at least
    s honest values remain on the far side (under a normal model of the honest values).
    """
    if num_clients < 1 or not 1 <= num_malicious <= num_clients:
        raise ValueError(f"alie_z: need 1 <= num_malicious <= num_clients, got {num_malicious} of {num_clients}")
    s = math.floor(num_clients / 2 + 1) - num_malicious
    p = (num_clients - s) / num_clients
    if not 0.0 < p < 1.0:
        raise ValueError(
            f"alie_z: undefined for {num_malicious} malicious of {num_clients} clients "
            "(the attackers already form a majority); give z explicitly"
        )
    return NormalDist().inv_cdf(p)


def alie(honest: Tensor, own: Tensor, generator: torch.Generator | None = None, *, z: float | None = None) -> Tensor:
    """ALIE ("A little is enough"): every malicious client sends mean - z * std of the honest updates.

    std is the per-coordinate sample standard deviation (Bessel-corrected). z defaults to
    `alie_z(n_honest + n_malicious, n_malicious)`.
    """
    _check_inputs("alie", honest, own, min_honest=2)
    if z is None:
        z = alie_z(honest.shape[0] + own.shape[0], own.shape[0])
    _check_finite("alie", z=z)
    mean, std = honest.mean(dim=0), honest.std(dim=0)
    return _coordinated(mean - z * std, own)


def non_omniscient(honest: Tensor, own: Tensor, generator: torch.Generator | None = None, *, kappa: float = 1.0) -> Tensor:
    """Every malicious client sends mu - kappa * sigma of the malicious clients' own updates (per coordinate).

    sigma is the Bessel-corrected standard deviation, so at least two malicious clients are needed;
    the honest updates are not used: this adversary knows only its own clients' data.
    """
    _check_inputs("non_omniscient", honest, own)
    _check_finite("non_omniscient", kappa=kappa)
    if own.shape[0] < 2:
        raise ValueError(f"non_omniscient: needs at least 2 malicious clients to estimate sigma, got {own.shape[0]}")
    return _coordinated(own.mean(dim=0) - kappa * own.std(dim=0), own)


def ipm(honest: Tensor, own: Tensor, generator: torch.Generator | None = None, *, eps: float = 0.5) -> Tensor:
    """Inner-product manipulation: every malicious client sends -eps times the honest mean."""
    _check_inputs("ipm", honest, own, min_honest=1)
    _check_finite("ipm", eps=eps)
    if eps <= 0:
        raise ValueError(f"ipm: eps must be > 0, got {eps}")
    return _coordinated(-eps * honest.mean(dim=0), own)


MIN_MAX_PERTURBATIONS = ("std", "unit", "sign", "mean")


def min_max_perturbation(honest: Tensor, kind: str) -> Tensor:
    """The direction min-max moves along: -std, -mean/||mean|| ("unit"), -sign(mean) or -mean."""
    mean = honest.mean(dim=0)
    if kind == "std":
        return -honest.std(dim=0)
    if kind == "mean":
        return -mean
    if kind == "unit":
        norm = torch.linalg.vector_norm(mean)
        return -mean / norm if norm > 0 else torch.zeros_like(mean)
    if kind == "sign":
        return -torch.sign(mean)
    raise ValueError(f"min_max: unknown perturbation {kind!r} (known: {', '.join(MIN_MAX_PERTURBATIONS)})")


def largest_gamma(feasible: Callable[[float], bool], gamma_init: float, tol: float, gamma_max: float) -> float | None:
    """The edge of the feasible gammas >= 0: doubling from gamma_init while feasible, then bisection.

    Assumes the feasible gammas form an interval [0, gamma*] (gamma = 0 itself need not be
    feasible: then 0 comes back). The bracket is narrowed until narrower than `tol` (relative
    to gamma*, absolute below 1); the feasible end comes back, so the bound holds there. None
    when gamma_max is still feasible: the constraint never binds along this direction.
    """
    low, high = 0.0, gamma_init
    while feasible(high):
        low, high = high, 2.0 * high
        if high > gamma_max:
            return None
    while high - low > tol * max(1.0, low):
        middle = 0.5 * (low + high)
        if feasible(middle):
            low = middle
        else:
            high = middle
    return low


def _check_search(name: str, gamma_init: float, tol: float) -> None:
    _check_finite(name, gamma_init=gamma_init, tol=tol)
    if gamma_init <= 0 or tol <= 0:
        raise ValueError(f"{name}: gamma_init and tol must be > 0, got {gamma_init} and {tol}")


def within_honest_spread(honest: Tensor) -> Callable[[Tensor], bool]:
    """Min-max's bound: is a vector no farther from any honest update than the two farthest honest updates are apart?"""
    work = honest.to(torch.float64)
    bound = torch.cdist(work, work).max()
    return lambda vector: bool(torch.cdist(vector.to(torch.float64)[None], work).max() <= bound)


def min_max(
    honest: Tensor,
    own: Tensor,
    generator: torch.Generator | None = None,
    *,
    perturbation: str = "std",
    gamma_init: float = 10.0,
    tol: float = 1e-5,
) -> Tensor:
    """Min-max: mean + gamma * p with the largest gamma keeping max_i ||mal - h_i|| <= max_ij ||h_i - h_j||.

    gamma = 0 (the mean) always satisfies the bound (the mean lies in the honest updates'
    convex hull), and the farthest distance is convex in gamma, so the feasible gammas >= 0 form
    an interval [0, gamma*], found by `largest_gamma`; the bound always holds at the result.
    """
    _check_inputs("min_max", honest, own, min_honest=2)
    _check_search("min_max", gamma_init, tol)
    work = honest.to(torch.float64)
    mean = work.mean(dim=0)
    direction = min_max_perturbation(work, perturbation)
    if not torch.any(direction):
        return _coordinated(mean, own)
    inside = within_honest_spread(work)
    gamma = largest_gamma(lambda g: inside(mean + g * direction), gamma_init, tol, 1e30)
    if gamma is None:  # the direction never leaves the ball: an unbounded attack
        raise ValueError("min_max: the perturbation never violates the distance bound; honest updates are degenerate")
    return _coordinated(mean + gamma * direction, own)


# The adaptive attack's test: does the round's defence keep every malicious client sending this vector?
Accepts = Callable[[Tensor], bool]


def adaptive(
    honest: Tensor,
    own: Tensor,
    generator: torch.Generator | None = None,
    accepts: Accepts | None = None,
    *,
    perturbation: str = "mean",
    gamma_init: float = 1.0,
    tol: float = 1e-3,
    gamma_max: float = 1e6,
) -> Tensor:
    """An adversary that knows the defence's rule: mean + gamma * p with the largest gamma the defence still lets through.

    `accepts(vector)` says whether the defence in use keeps every malicious client when all of
    them send `vector` (`Adversary` builds it from the round's defence, see
    `defence_accepts`); gamma is the edge `largest_gamma` finds, doubling from gamma_init and
    bisecting to `tol`. That assumes the accepted gammas form an interval from 0; for zprobe
    they need not (its spread grows with the attack, see strategies/zprobe.py), and the search
    then stops at one edge of them. A randomized defence (zprobe draws clusters and
    coordinates) is simulated with the adversary's own seed, so at the real round the
    malicious clients may still be caught. Without `accepts` (no defence, or one that drops no
    client: median, trimmed mean, whose output every update enters), gamma obeys min-max's
    defence-agnostic bound instead (Shejwalkar and Houmansadr 2021): no farther from any honest
    update than the honest updates are from each other. When gamma_max is still accepted the
    rule never binds along p, and gamma_max is sent. p: see `min_max_perturbation`.
    """
    _check_inputs("adaptive", honest, own, min_honest=2)
    _check_search("adaptive", gamma_init, tol)
    _check_finite("adaptive", gamma_max=gamma_max)
    work = honest.to(torch.float64)
    mean = work.mean(dim=0)
    direction = min_max_perturbation(work, perturbation)
    if not torch.any(direction):
        return _coordinated(mean, own)
    test = accepts if accepts is not None else within_honest_spread(work)
    gamma = largest_gamma(lambda g: test((mean + g * direction).to(own.dtype)), gamma_init, tol, gamma_max)
    return _coordinated(mean + (gamma_max if gamma is None else gamma) * direction, own)


class Screens(Protocol):
    """What the adaptive attack needs of a defence (strategies.robust.Defence has it)."""

    drops_clients: bool

    def screen(self, updates: Tensor, weights: Tensor, seed: int) -> Any:
        """A verdict with `kept`, the indices of the updates it keeps."""


def defence_accepts(defence: Screens, updates: Tensor, malicious_rows: list[int], weights: Tensor, seed: int) -> Accepts:
    """accepts(vector): with every malicious row set to `vector`, does `defence` keep as many of them as it can?

    "As many as it can": all of them, or, for a rule keeping fewer clients than there are
    attackers (Krum keeps one), only malicious ones. A defence that refuses the round outright
    (a ValueError, e.g. a value too large for zprobe's fixed-point ring) does not accept.
    """

    def accepts(vector: Tensor) -> bool:
        trial = updates.clone()
        trial[malicious_rows] = vector.to(trial.dtype)
        try:
            kept = set(defence.screen(trial, weights, seed).kept)
        except ValueError:
            return False
        return bool(kept) and len(kept & set(malicious_rows)) == min(len(malicious_rows), len(kept))

    return accepts


MODEL_ATTACKS: dict[str, ModelAttack] = {
    "sign_flip": sign_flip,
    "scaling": scaling,
    "gaussian_noise": gaussian_noise,
    "alie": alie,
    "non_omniscient": non_omniscient,
    "ipm": ipm,
    "min_max": min_max,
    "adaptive": adaptive,
}


def attack_parameters(name: str) -> dict[str, Any]:
    """The keyword parameters an attack accepts, with their defaults."""
    return keyword_parameters(_lookup(name))


def keyword_parameters(attack: ModelAttack) -> dict[str, Any]:
    """An attack function's keyword-only parameters (its options), with their defaults."""
    return {p.name: p.default for p in inspect.signature(attack).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY}


def model_attack(name: str) -> ModelAttack | None:
    """The model attack a name refers to: a built-in one, or a function from outside the package
    (fedlora/plugins.py); None for any other name. A PluginError (a ValueError) says why an
    outside one cannot be had."""
    if name in MODEL_ATTACKS:
        return MODEL_ATTACKS[name]
    if name in ATTACK_NAMES:  # none, or a data attack
        return None
    found = load_plugin("attack.name", name)
    if found is not None and not callable(found):
        raise PluginError(f"attack.name: {name!r} is a {type(found).__name__}, not a function; see docs/extending.md")
    return found


def _lookup(name: str) -> ModelAttack:
    attack = model_attack(name)
    if attack is None:
        known = ", ".join([*MODEL_ATTACKS, "label_flip"])
        hint = " (label_flip is data poisoning: use flip_labels on the training labels)" if name == "label_flip" else ""
        raise ValueError(f"unknown model attack {name!r}{hint}; known: {known}")
    return attack


def apply_model_attack(
    name: str,
    honest: Tensor,
    own: Tensor,
    seed: int | torch.Generator,
    params: Mapping[str, Any] | None = None,
) -> Tensor:
    """Run the attack `name` with `params`; a ValueError names any unknown attack or parameter.

    `seed` is an int (a fresh generator is seeded from it) or a torch.Generator used as is.
    """
    attack = _lookup(name)
    params = dict(params or {})
    unknown = sorted(set(params) - set(attack_parameters(name)))
    if unknown:
        allowed = ", ".join(attack_parameters(name)) or "none"
        raise ValueError(f"attack {name!r}: unknown parameter(s) {', '.join(unknown)} (allowed: {allowed})")
    generator = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(int(seed))
    return attack(honest, own, generator, **params)


def choose_malicious(num_clients: int, fraction: float, seed: int) -> list[int]:
    """The malicious clients of a run: floor(fraction * num_clients) indices in range(num_clients), sorted.

    Draws from its own `random.Random(seed)`, so the same (num_clients, fraction, seed) always
    gives the same set; call it once per run and keep the result.
    """
    if num_clients < 0:
        raise ValueError(f"choose_malicious: num_clients must be >= 0, got {num_clients}")
    if not (math.isfinite(fraction) and 0.0 <= fraction <= 1.0):
        raise ValueError(f"choose_malicious: fraction must be in [0, 1], got {fraction}")
    # The small epsilon keeps e.g. 0.3 * 10 = 2.9999999999999996 from rounding down to 2.
    count = math.floor(fraction * num_clients + 1e-9)
    return sorted(random.Random(seed).sample(range(num_clients), count))


def flip_labels(labels: Tensor, num_classes: int) -> Tensor:
    """Label flipping (data poisoning): y -> num_classes - 1 - y, for integer labels in [0, num_classes)."""
    if num_classes < 2:
        raise ValueError(f"flip_labels: num_classes must be >= 2, got {num_classes}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"flip_labels: labels must be an integer tensor, got {labels.dtype}")
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"flip_labels: labels must lie in [0, {num_classes}), got range [{int(labels.min())}, {int(labels.max())}]"
        )
    return (num_classes - 1) - labels


DATA_ATTACKS: dict[str, Callable[[Tensor, int], Tensor]] = {"label_flip": flip_labels}


NO_ATTACK = "none"
ATTACK_NAMES = (NO_ATTACK, *MODEL_ATTACKS, *DATA_ATTACKS)


def check_attack(name: str, options: Mapping[str, Any]) -> None:
    """Raise ValueError for an unknown attack or an option it does not take (config validation)."""
    attack = model_attack(name)
    if attack is None and name not in ATTACK_NAMES:
        raise ValueError(
            f"unknown attack {name!r} (known: {', '.join(ATTACK_NAMES)}; or an outside function as package.module:function, "
            "or an installed entry point: docs/extending.md)"
        )
    allowed = keyword_parameters(attack) if attack is not None else {}
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"attack {name!r} takes no option {', '.join(unknown)} (allowed: {', '.join(allowed) or 'none'})")


# Model attacks that need this many honest updates of the round to compute theirs.
_MIN_HONEST = {"alie": 2, "ipm": 1, "min_max": 2, "adaptive": 2}
# ... and this many of the malicious clients' own (non_omniscient estimates sigma from them).
_MIN_OWN = {"non_omniscient": 2}


class Adversary:
    """The adversary of one simulated run.

    Parameters
    ----------
    name, options : the attack (see ATTACK_NAMES) and its parameters.
    num_clients, fraction : floor(fraction * num_clients) clients are malicious, for the whole run.
    seed : the run's seed; who is malicious and every random draw of the attack derive from it.
    """

    def __init__(self, name: str, options: Mapping[str, Any], num_clients: int, fraction: float, seed: int) -> None:
        check_attack(name, options)
        self.name = name
        self.options = dict(options)
        self.seed = seed
        self.attack = model_attack(name)  # None: no attack, or a data attack
        active = name != NO_ATTACK
        self.malicious = frozenset(choose_malicious(num_clients, fraction, derive_seed(seed, "malicious")) if active else [])

    @property
    def poisons_data(self) -> bool:
        """Whether the malicious clients train on flipped labels."""
        return self.name in DATA_ATTACKS and bool(self.malicious)

    def rewrite(
        self,
        updates: Mapping[int, Tensor],
        server_round: int,
        defence: Screens | None = None,
        weights: Mapping[int, float] | None = None,
    ) -> dict[int, Tensor]:
        """The replacement updates of this round's malicious clients (client id -> flattened update).

        `updates` holds every valid update of the round; the adversary sees the honest ones.
        `defence` and `weights` (client id -> weight, normalised here; uniform when None) are
        the round's, for `adaptive`, which simulates the defence on the updates in client order
        with its own seed. Empty when the attack is not a model attack, no malicious client
        replied, or the round has too few honest (or, for non_omniscient, malicious) updates for
        the attack to be computed (they then send what they trained).
        """
        bad = sorted(c for c in updates if c in self.malicious)
        honest = [updates[c] for c in sorted(updates) if c not in self.malicious]
        too_few = len(honest) < _MIN_HONEST.get(self.name, 0) or len(bad) < _MIN_OWN.get(self.name, 1)
        if self.attack is None or not bad or too_few:
            return {}
        own = torch.stack([updates[c] for c in bad])
        honest_matrix = torch.stack(honest) if honest else own[:0]
        seed = derive_seed(self.seed, "attack", server_round)
        if self.name == "adaptive":
            accepts = self._defence_test(updates, bad, defence, weights, server_round)
            poisoned = adaptive(honest_matrix, own, torch.Generator().manual_seed(seed), accepts, **self.options)
        else:
            poisoned = apply_model_attack(self.name, honest_matrix, own, seed, self.options)
        return dict(zip(bad, poisoned))

    def _defence_test(
        self,
        updates: Mapping[int, Tensor],
        bad: list[int],
        defence: Screens | None,
        weights: Mapping[int, float] | None,
        server_round: int,
    ) -> Accepts | None:
        """The adaptive attack's test for this round's defence; None (min-max's bound) when it drops no one."""
        if defence is None or not defence.drops_clients:
            return None
        order = sorted(updates)
        shares = torch.tensor([1.0 if weights is None else float(weights[c]) for c in order], dtype=torch.float64)
        rows = [order.index(c) for c in bad]
        matrix = torch.stack([updates[c] for c in order])
        return defence_accepts(defence, matrix, rows, shares / shares.sum(), derive_seed(self.seed, "adaptive", server_round))
