"""What "alpha" means in other flow libraries, and this tool's alpha for theirs.

This tool (like TFGENZOO's LogitifyImage) squeezes [0,1] into
[alpha/2, 1 - alpha/2]: p = z(1-alpha) + alpha/2. RealNVP's code maps into
[a, 1 - a] (its data_constraint 0.9 gives [0.05, 0.95], a = 0.05), so its
a is this tool's 2a. Doubling a float is exact, so both spellings give the
same parameters and the same shard bytes. README "What alpha means
elsewhere" gives each library's squeeze, divisor, noise and log-det terms,
read from its own code.
"""
from __future__ import annotations

from .errors import AlphaOutOfRange, UsageError

CONVENTIONS = ("tfgenzoo", "realnvp")
# The open interval each convention's alpha must lie in to name a squeeze at all.
RANGES = {"tfgenzoo": (0.0, 1.0), "realnvp": (0.0, 0.5)}
SQUEEZE = {"tfgenzoo": "[alpha/2, 1-alpha/2]", "realnvp": "[alpha, 1-alpha]"}


def tool_alpha(alpha: float, convention: str = "tfgenzoo") -> float:
    """This tool's alpha for `alpha` as the named library spells it."""
    if convention not in RANGES:
        raise UsageError(f"alpha convention must be one of {', '.join(CONVENTIONS)}, got {convention!r}")
    low, high = RANGES[convention]
    if not low < alpha < high:
        raise AlphaOutOfRange(
            f"a {convention} alpha squeezes into {SQUEEZE[convention]}, so it must lie in ({low:g}, {high:g}); "
            f"got {alpha!r}", alpha=alpha, convention=convention, low=low, high=high)
    return 2.0 * alpha if convention == "realnvp" else alpha


def alpha_equivalents(alpha: float) -> dict:
    """The same squeeze as each convention writes its alpha (what the manifest records)."""
    return {"tfgenzoo": alpha, "realnvp": alpha / 2.0}


def squeeze_interval(alpha: float) -> tuple:
    """[low, high] that p = z(1-alpha) + alpha/2 fills, this tool's alpha."""
    return alpha / 2.0, 1.0 - alpha / 2.0
