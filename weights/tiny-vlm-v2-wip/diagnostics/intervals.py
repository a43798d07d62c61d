"""Shared by the diagnostics: a proportion's 95% Wilson score interval."""

import math


def wilson_interval(right: int, total: int, z: float = 1.96):
    """The 95% Wilson score interval of a proportion right / total."""
    p = right / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return centre - half, centre + half
