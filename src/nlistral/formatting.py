"""How numbers from metrics files are shown (report templates, `nlistral report --experiments`): as stored, so a
reader can check each against its file (percentages of stored fractions)."""


def pct(value, signed=False) -> str:
    """0.8958 -> "89.58%" (fractions are stored with 4 decimals: 2 decimals of a percentage are exact)."""
    if value is None:
        return "–"
    return f"{value * 100:+.2f}" if signed else f"{value * 100:.2f}%"


def interval(bounds, signed=False) -> str:
    low, high = bounds
    if signed:
        return f"[{pct(low, True)} pp, {pct(high, True)} pp]"
    return f"[{pct(low)}, {pct(high)}]"


def pvalue(value) -> str:
    return "–" if value is None else f"{value:.3g}"


def num(value) -> str:
    """An int, a float or null from a metrics file, as written there."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    return f"{value:g}" if abs(value) >= 1e-4 or value == 0 else f"{value:.3g}"
