"""README.md's links resolve: to a file of the repository, and to a heading of it when they name an anchor
(mkdocs --strict checks the docs/ pages themselves in `make lint`)."""

import re

from conftest import REPO

LINK = re.compile(r"\]\(([^)\s]+)\)")


def heading_ids(text: str) -> set[str]:
    """The ids mkdocs (and GitHub) give a page's headings: lower case, punctuation dropped, spaces -> '-'."""
    ids = set()
    for heading in re.findall(r"(?m)^#{1,6} (.+)$", text):
        ids.add(re.sub(r"[-\s]+", "-", re.sub(r"[^\w\s-]", "", heading.replace("`", "")).strip().lower()))
    return ids


def test_readme_links_resolve():
    readme = (REPO / "README.md").read_text()
    broken = []
    for target in LINK.findall(readme):
        if re.match(r"[a-z]+:", target):  # http(s):, mailto:
            continue
        path, _, anchor = target.partition("#")
        page = REPO / path if path else REPO / "README.md"
        if not page.exists() or (anchor and anchor not in heading_ids(page.read_text())):
            broken.append(target)
    assert not broken, f"README.md links to what is not there: {broken}"
