"""Hostile strings in the report (issue 31, items 1-2): every string that reaches reports/index.html, results.md or the
cards, put there by data or config (a test set's name, its tag column and values, the experiment's name, a model
id, the teacher's model name, the seeds table's labels, data.name), shows as typed and never becomes markup.

Bugs these catch, each seen failing: `select_autoescape(["html"])` leaves `index.html.j2` unescaped (a tag value's
`<img onerror>` ran in Chromium and DVC_EXP_NAME's `<script>` set the title); results.md put a tag value's `|` and
`<img>` raw into its tables (an extra column, live HTML on a code host).
"""

import csv
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import yaml
from test_report import outputs, write_test_set_outputs  # noqa: F401 (outputs: the fixture this one builds on)

from nlistral import paths
from nlistral.config import load_config
from nlistral.stages import report


def hostile(field: str, slash: bool = True) -> str:
    """A string that would run script in the page and break a Markdown table (`field` says where it came from)."""
    markup = '<img src=x onerror="window.pwned=1">' + ("<script>window.pwned=1</script>" if slash else "")
    return f"{field} {markup} | `tick` [link](http://e.invalid) x"


EXP, MODEL, TEACHER, SET, TAG, VALUE, LABEL, GROUP, RUN, DATA = (
    hostile("exp"), hostile("model"), hostile("teacher"), hostile("set", slash=False), hostile("tag"), hostile("value"),
    hostile("label"), hostile("group"), hostile("run"), hostile("data"),
)  # fmt: skip
SHOWN = {"experiment": EXP, "model id": MODEL, "set": SET, "tag": TAG, "label": LABEL, "group_by": GROUP, "run": RUN}


@pytest.fixture(scope="module")
def attacked(outputs, tmp_path_factory):  # noqa: F811
    """The report stage on outputs whose every shown string is hostile (module doc)."""
    root = tmp_path_factory.mktemp("attacked")
    shutil.copytree(outputs, root, dirs_exist_ok=True)
    cwd, env = os.getcwd(), dict(os.environ)
    os.chdir(root)
    try:
        source = Path("data/sample/diagnostic.csv")
        with open(source, encoding="utf-8", newline="") as handle:
            rows = list(csv.DictReader(handle))
        for i, row in enumerate(rows):
            row[TAG] = VALUE if i % 2 else row["phenomenon"]
        with open(source, "w", encoding="utf-8", newline="") as handle:
            writer = csv.DictWriter(handle, list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        params = yaml.safe_load(Path("params.yaml").read_text())
        params["data"]["name"] = DATA  # shown in the cards
        params["eval"]["test_sets"] = {SET: {**params["eval"]["test_sets"]["diagnostic"], "tags": [TAG, "phenomenon"]}}
        Path("params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        shutil.rmtree("metrics/test_sets")
        write_test_set_outputs(load_config())
        for path in (paths.EVAL_METRICS, paths.EVAL_BASE_METRICS, paths.EVAL_TEACHER_METRICS):
            metrics = json.loads(Path(path).read_text())
            Path(path).write_text(json.dumps({**metrics, "model_id": MODEL}))
        for split in report.SPLITS:
            path = Path(paths.THOUGHTS_METRICS.format(split=split))
            path.write_text(json.dumps({**json.loads(path.read_text()), "model": TEACHER}))
        seeds = {"reference": LABEL, "group_by": [GROUP], "rows": 44, "bootstrap": 100, "seed": 1, "configurations": {
            LABEL: {"experiments": [RUN, "b"], "n_seeds": 2, "mean": 0.5, "sd": 0.01, "min": 0.49, "max": 0.51},
            "other": {"experiments": ["c"], "n_seeds": 1, "mean": 0.6, "sd": 0.0, "min": 0.6, "max": 0.6,
                      "versus_reference": {"difference": 0.1, "difference_ci95": [0.0, 0.2], "seed_sd": 0.01,
                                           "exceeds_seed_spread": True}}}}  # fmt: skip
        Path(paths.SEEDS).write_text(json.dumps(seeds))
        os.environ["DVC_EXP_NAME"] = EXP
        report.run(load_config())
    finally:
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(env)
    return root


def test_page_shows_hostile_strings_as_text_and_runs_none(attacked):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = shutil.which("chromium")
        assert chromium, "this test needs Debian's chromium package: `make browser` (apt-get install -y chromium)"
        browser = pw.chromium.launch(executable_path=chromium, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--no-first-run"])  # fmt: skip
        page = browser.new_page()
        page.goto((attacked / paths.REPORT_PAGE).as_uri())
        page.click("#tab-sets")
        page.wait_for_timeout(200)  # an onerror handler runs once its image fails: give it the chance
        assert page.evaluate("window.pwned") is None
        assert page.evaluate("document.querySelectorAll('[onerror], a[href^=\"http\"]').length") == 0
        assert page.evaluate("[...document.images].every(i => i.src.startsWith('data:image/svg+xml'))")
        assert page.title() == f"NLIstral report: {EXP}"
        text = page.locator("body").inner_text()
        for where, typed in SHOWN.items():
            assert typed in text, f"{where} not shown as typed"
        assert page.locator("table.by-tag", has_text=VALUE).count() == 1
        options = page.locator("#set-filter option, #tag-filter option").all_inner_texts()
        assert SET in options and f"{TAG}={VALUE}" in options
        browser.close()


def table_rows(text: str) -> list[list[str]]:
    """Every table of a Markdown file as lists of rows, each row the cells its unescaped pipes delimit."""
    tables, current = [], []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables.append(current)
            current = []
    return tables


CODE_SPAN = re.compile(r"(?<!\\)`[^`]*(?<!\\)`")


def cells(row: str) -> int:
    return len(row.replace("\\|", "").strip().strip("|").split("|"))


@pytest.mark.parametrize("name", [paths.REPORT_RESULTS, paths.REPORT_MODEL_CARD, paths.REPORT_DATASET_CARD])
def test_markdown_tables_keep_their_columns_and_hold_no_markup(attacked, name):
    text = (attacked / name).read_text()
    body = re.sub(r"\A---\n.*?\n---\n", "", text, flags=re.S)  # the cards' YAML front matter is data, not markup
    assert "<img" not in body and "<script" not in body  # escaped everywhere, tables or not
    tables = table_rows(text)
    assert tables
    for table in tables:
        for row in table:
            assert cells(row) == cells(table[0]), f"{name}: {row!r} has not its header's {cells(table[0])} cells"
            text_only = CODE_SPAN.sub("", row)  # a code span shows `<` as typed
            assert "<" not in text_only and "](" not in text_only.replace("\\](", ""), f"{name}: markup in {row!r}"
    if name == paths.REPORT_RESULTS:
        for typed in (SET, VALUE, MODEL, LABEL):  # each still there, escaped
            assert typed.split(" <")[0] in text
