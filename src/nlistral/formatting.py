"""How numbers from metrics files are shown (report templates, `nlistral report --experiments`): as stored, so a
reader can check each against its file (percentages of stored fractions)."""


def pct(value, signed=False) -> str:
    """0.8958 -> "89.58%" (fractions are stored with 4 decimals: 2 decimals of a percentage are exact)."""
    if value is None:
        return "–"
    return f"{value * 100:+.2f}" if signed else f"{value * 100:.2f}%"


def interval(bounds, signed=False) -> str:
    if bounds is None:  # no rows, or (across seeds) fewer than two seeds
        return "–"
    low, high = bounds
    if signed:
        return f"[{pct(low, True)} pp, {pct(high, True)} pp]"
    return f"[{pct(low)}, {pct(high)}]"


def signed(value) -> str:
    """A difference of scores that are not percentages (macro F1): 0.1945 -> "+0.1945"."""
    return "–" if value is None else f"{value:+.4f}"


def bounds(values, signed=False) -> str:
    """An interval of such scores: [0.6512, 0.7342], or [+0.0123, +0.2345] for a difference."""
    if values is None:
        return "–"
    return "[" + ", ".join(f"{v:+.4f}" if signed else f"{v:.4f}" for v in values) + "]"


def pvalue(value, digits: int = 3) -> str:
    """`digits` significant digits, more where those would round across 0.05: p = 0.049983 shows "0.04998", never
    "0.05" (a p-value decides against 0.05: docs/evaluation.md)."""
    if value is None:
        return "–"
    for shown in range(digits, 18):  # 17 significant digits are the float itself
        text = f"{value:.{shown}g}"
        if (float(text) < 0.05) == (value < 0.05):
            return text
    return text


def num(value) -> str:
    """An int, a float or null from a metrics file, as written there."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    return f"{value:g}" if abs(value) >= 1e-4 or value == 0 else f"{value:.3g}"
