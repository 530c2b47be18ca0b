"""What "alpha" means in other flow libraries, and this tool's alpha for theirs.

This tool (like TFGENZOO's LogitifyImage) squeezes [0,1] into
[alpha/2, 1 - alpha/2]: p = z(1-alpha) + alpha/2. RealNVP maps into
[alpha, 1 - alpha]: p = alpha + (1 - 2 alpha) z, so its alpha a is this
tool's 2a. Doubling a float is exact, so both spellings give the same
parameters and the same shard bytes.
"""
from __future__ import annotations

CONVENTIONS = ("tfgenzoo", "realnvp")


def tool_alpha(alpha: float, convention: str = "tfgenzoo") -> float:
    """This tool's alpha for `alpha` as the named library spells it."""
    if convention == "tfgenzoo":
        return alpha
    if convention == "realnvp":
        if not 0.0 < alpha < 0.5:
            raise ValueError(f"a RealNVP alpha maps into [alpha, 1-alpha] and must lie in (0, 0.5), got {alpha!r}")
        return 2.0 * alpha
    raise ValueError(f"alpha convention must be one of {', '.join(CONVENTIONS)}, got {convention!r}")


def alpha_equivalents(alpha: float) -> dict:
    """The same squeeze as each convention writes its alpha (what the manifest records)."""
    return {"tfgenzoo": alpha, "realnvp": alpha / 2.0}
