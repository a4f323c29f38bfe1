"""How numbers from metrics files are shown (report templates, `nlistral report --experiments`): as stored, so a
reader can check each against its file (percentages of stored fractions); and text from data made safe to print
(`terminal`) or to Markdown (`md`, `code`: the report's filters, the tables `nlistral report --experiments` prints)."""

import re

# C0 and C1 controls but tab and newline (ESC and CSI start the sequences that clear the screen, retitle the window or
# write the clipboard; CR overwrites a line), and the bidi controls that reorder what follows (U+202E)
CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def terminal(text: str) -> str:
    """`text` to print: each control character that could drive the terminal shown as its escape (`\\x1b`)."""
    return CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), str(text))


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


# `_` only where it could open or close emphasis: `lexical_overlap` stays as it is
MD_SPECIAL = re.compile(r"([\\`|\[\]*~]|(?<![^\W_])_|_(?![^\W_]))")
AUTOLINK = re.compile(r"(?<=\w)(:)(?=//)|(?<![\w.])(www)(\.)", re.IGNORECASE)  # where GFM starts a bare-URL link


def md(value) -> str:
    """A string from data or config as Markdown text, shown as typed: one line; `|`, backticks, brackets, `*`, `_`,
    `~` and backslashes escaped, `&`, `<` and `>` as entities, and `://` / `www.` escaped, so it can add neither a
    table cell, a link (bare URLs included), a code span, emphasis nor HTML."""
    text = " ".join(str(value).split())
    text = MD_SPECIAL.sub(r"\\\1", text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return AUTOLINK.sub(lambda m: "\\:" if m.group(1) else f"{m.group(2)}\\.", text)


def code(value) -> str:
    """A code span of `value`, or its `md` text where a code span could not hold it as typed."""
    text = str(value)
    return f"`{text}`" if text == " ".join(text.split()) and not re.search(r"[`|<>\[\]\\]", text) else md(text)
