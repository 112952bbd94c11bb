"""Site-level differential privacy for the sparse update (issue 12, item 3; docs/federated_privacy.md).

Each site clips the change of its flat update (the k agreed values followed by the head) against the
round's global values to L2 norm ``clip`` and adds Gaussian noise of standard deviation
``noise_multiplier * clip`` to every coordinate *before the update leaves the site* (the DP-FedAvg
Gaussian mechanism of McMahan et al., ICLR 2018, with the noise placed at the site, so neither the
server nor the network ever sees an un-noised update).

Accountant: every site takes part in every round (no sampling amplification), so ``rounds`` releases
of a Gaussian mechanism with L2 sensitivity ``clip`` and noise ``sigma * clip`` compose *exactly* into
one Gaussian mechanism with noise multiplier ``sigma / sqrt(rounds)``, i.e. mu-Gaussian DP with
``mu = sqrt(rounds) / sigma`` (Dong, Roth & Su 2019, Cor. 3.3). Its (epsilon, delta) curve is known in
closed form (Balle & Wang, ICML 2018, Thm. 8):
``delta(eps) = Phi(-eps/mu + mu/2) - exp(eps) * Phi(-eps/mu - mu/2)``, solved here for epsilon by
bisection. This is tight, so it is the default (``method="gdp"``). Two looser bounds are kept for
cross-checks: ``"rdp"`` (Renyi DP ``rounds * a / (2 sigma^2)``, converted with Canonne, Kamath & Steinke
2020, Prop. 12, minimised over the order ``a``; what Flower's ``RdpAccountant`` / Google's
``dp_accounting`` compute, on a grid of orders) and ``"zcdp"`` (``rho = rounds / (2 sigma^2)``,
``eps = rho + 2 sqrt(rho ln(1/delta))``; Bun & Steinke 2016). Always ``gdp <= rdp <= zcdp``.

Neighbouring relation: the sensitivity is ``clip`` when one site's whole (clipped) contribution is
added or removed (site-level DP). Protecting against *replacement* of a site's data costs twice the
sensitivity: use ``epsilon(noise_multiplier / 2, ...)`` for that reading.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["METHODS", "PrivacyConfig", "epsilon", "gdp_delta", "noise_multiplier_for", "privatize"]

METHODS = ("gdp", "rdp", "zcdp")


@dataclass(frozen=True)
class PrivacyConfig:
    """Clipping bound and noise of the site-level Gaussian mechanism.

    Attributes:
        clip: L2 bound on the change of one site's update per round (> 0).
        noise_multiplier: noise standard deviation in units of ``clip`` (>= 0; 0 clips only and gives
            no privacy guarantee).
        delta: the delta at which epsilon is reported, in (0, 1).

    Example:
        >>> PrivacyConfig(clip=0.1, noise_multiplier=1.0).noise_std
        0.1
    """

    clip: float
    noise_multiplier: float
    delta: float = 1e-5

    def __post_init__(self) -> None:
        if not (_is_real(self.clip) and math.isfinite(self.clip) and self.clip > 0):
            raise ValueError(f"clip must be a positive finite L2 norm bound, got {self.clip!r}.")
        if not (_is_real(self.noise_multiplier) and math.isfinite(self.noise_multiplier)):
            raise ValueError(f"noise_multiplier must be a finite number >= 0, got {self.noise_multiplier!r}.")
        if self.noise_multiplier < 0:
            raise ValueError(f"noise_multiplier must be >= 0, got {self.noise_multiplier!r}.")
        _check_delta(self.delta)

    @property
    def noise_std(self) -> float:
        """Standard deviation of the Gaussian noise added to each coordinate."""
        return float(self.noise_multiplier * self.clip)

    def epsilon(self, rounds: int) -> float:
        """Epsilon at ``self.delta`` after ``rounds`` rounds (see :func:`epsilon`)."""
        return epsilon(self.noise_multiplier, rounds, self.delta)


def privatize(
    update: np.ndarray, reference: np.ndarray, cfg: PrivacyConfig, rng: np.random.Generator
) -> tuple[np.ndarray, dict]:
    """Clip ``update - reference`` to L2 norm ``cfg.clip``, add noise, return ``reference + noisy change``.

    Args:
        update: the site's flat trained values (k sparse values then the head).
        reference: the global values the site started the round from, same shape.
        cfg: clipping bound and noise multiplier.
        rng: the site's random generator (seed it from the site and round only in tests: noise that a
            server can predict protects nothing).

    Returns:
        ``(private_update, stats)`` with the update in ``update``'s floating dtype and stats
        ``{"norm": change norm before clipping, "clipped": bool, "noise_std": float}``.
    """
    u = _finite_vector(update, "update")
    r = _finite_vector(reference, "reference")
    if u.shape != r.shape:
        raise ValueError(
            f"update has shape {u.shape} but reference has shape {r.shape}: pass the same agreed "
            "coordinates (k values then the head) for both."
        )
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"rng must be a numpy.random.Generator (np.random.default_rng()), got {type(rng)}.")
    change = u.astype(np.float64) - r.astype(np.float64)
    norm = float(np.linalg.norm(change))
    clipped = norm > cfg.clip
    if clipped:
        change *= cfg.clip / norm
    if cfg.noise_multiplier > 0:
        change += rng.normal(0.0, cfg.noise_std, size=change.shape)
    dtype = u.dtype if np.issubdtype(u.dtype, np.floating) else np.dtype(np.float64)
    out = (r.astype(np.float64) + change).astype(dtype)
    return out, {"norm": norm, "clipped": bool(clipped), "noise_std": cfg.noise_std}


def epsilon(noise_multiplier: float, rounds: int, delta: float, *, method: str = "gdp") -> float:
    """Epsilon of ``rounds`` full-participation Gaussian releases at ``delta`` (``inf`` without noise)."""
    sigma = _check_sigma(noise_multiplier)
    t = _check_rounds(rounds)
    _check_delta(delta)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
    if sigma == 0:
        return math.inf
    if method == "zcdp":
        rho = t / (2.0 * sigma**2)
        return rho + 2.0 * math.sqrt(rho * math.log(1.0 / delta))
    mu = math.sqrt(t) / sigma
    if method == "rdp" or mu > _GDP_MAX_MU:  # beyond _GDP_MAX_MU: the (looser, stable) RDP bound
        return _rdp_epsilon(t / (2.0 * sigma**2), delta)
    return _gdp_epsilon(mu, delta)


def noise_multiplier_for(target_epsilon: float, rounds: int, delta: float, *, method: str = "gdp") -> float:
    """Smallest noise multiplier (to 1e-6 relative) whose :func:`epsilon` is <= ``target_epsilon``.

    ``target_epsilon = inf`` gives 0.0 (no noise).
    """
    if not (_is_real(target_epsilon) and target_epsilon > 0) or math.isnan(target_epsilon):
        raise ValueError(f"epsilon must be > 0 (or inf for no noise), got {target_epsilon!r}.")
    if math.isinf(target_epsilon):
        return 0.0
    lo, hi = 1e-3, 1.0
    while epsilon(hi, rounds, delta, method=method) > target_epsilon:
        lo, hi = hi, hi * 2.0
        if hi > 1e8:
            raise ValueError(f"epsilon {target_epsilon} at delta {delta} needs a noise multiplier above 1e8.")
    if epsilon(lo, rounds, delta, method=method) <= target_epsilon:
        return lo
    while hi - lo > 1e-6 * hi:
        mid = 0.5 * (lo + hi)
        if epsilon(mid, rounds, delta, method=method) > target_epsilon:
            lo = mid
        else:
            hi = mid
    return hi


# Above this mu (noise multiplier below sqrt(rounds) / 1e4, epsilon above about 5e7) the exact curve
# loses precision to cancellation between terms near mu^2 / 2; no useful setting comes close.
_GDP_MAX_MU = 1e4


def gdp_delta(mu: float, eps: float) -> float:
    """Exact delta of mu-GDP at ``eps`` (Balle & Wang 2018, Thm. 8), computed in log space."""
    log_a = _log_phi(-eps / mu + mu / 2)
    ratio = eps + _log_phi(-eps / mu - mu / 2) - log_a  # log(e^eps Phi(b) / Phi(a)) <= 0
    return max(0.0, -math.exp(log_a) * math.expm1(min(ratio, 0.0)))


def _gdp_epsilon(mu: float, delta: float) -> float:
    if gdp_delta(mu, 0.0) <= delta:
        return 0.0
    lo, hi = 0.0, 1.0
    while gdp_delta(mu, hi) > delta:
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if gdp_delta(mu, mid) > delta:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * max(1.0, hi):
            break
    return hi


def _rdp_epsilon(rho: float, delta: float) -> float:
    """min over orders a > 1 of rho*a + log((a-1)/a) - (log(delta) + log(a)) / (a-1)."""

    def eps_at(a: float) -> float:
        return rho * a + math.log1p(-1.0 / a) - (math.log(delta) + math.log(a)) / (a - 1.0)

    # Convex in log(a - 1) over the useful range: golden-section search on a log grid.
    lo, hi = math.log(1e-6), math.log(1e6)
    g = (math.sqrt(5.0) - 1.0) / 2.0
    for _ in range(200):
        m1, m2 = hi - g * (hi - lo), lo + g * (hi - lo)
        if eps_at(1.0 + math.exp(m1)) < eps_at(1.0 + math.exp(m2)):
            hi = m2
        else:
            lo = m1
    return max(0.0, eps_at(1.0 + math.exp(0.5 * (lo + hi))))


def _log_phi(x: float) -> float:
    """log of the standard normal CDF, stable far into the lower tail."""
    z = -x / math.sqrt(2.0)
    if z < 25.0:
        return math.log(0.5 * math.erfc(z))
    # Asymptotic series of erfc(z) for large z (relative error < 1e-12 here).
    return -z * z - math.log(2.0 * z * math.sqrt(math.pi)) + math.log1p(-0.5 / z**2 + 0.75 / z**4)


def _finite_vector(x: np.ndarray, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 1:
        raise ValueError(f"{name} has shape {a.shape}; flatten it to 1-D (k values then the head).")
    if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
        raise ValueError(f"{name} has dtype {a.dtype}; pass real numbers.")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or infinite values; refuse the round's values at the site.")
    return a


def _is_real(x: object) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def _check_sigma(noise_multiplier: float) -> float:
    if not (_is_real(noise_multiplier) and math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise ValueError(f"noise_multiplier must be a finite number >= 0, got {noise_multiplier!r}.")
    return float(noise_multiplier)


def _check_rounds(rounds: int) -> int:
    if isinstance(rounds, bool) or not isinstance(rounds, (int, np.integer)) or rounds < 1:
        raise ValueError(
            f"rounds must be an integer >= 1 (federated rounds each site takes part in), got {rounds!r}."
        )
    return int(rounds)


def _check_delta(delta: float) -> None:
    if not (_is_real(delta) and 0.0 < delta < 1.0):
        raise ValueError(f"delta must be in (0, 1) (e.g. 1e-5, below 1/number of patients), got {delta!r}.")
