"""The docs cannot drift from what they describe: statements that list what the code has are checked against it.

- README.md's links resolve (mkdocs --strict checks the docs/ pages themselves in `make lint`);
- README.md's test table is what `nlistral summary` prints on the committed metrics;
- the subcommands docs/experiments.md lists are `nlistral --help`'s, every dvc.yaml stage runs one of them, and the
  README's DAG names every dvc.yaml stage;
- docs/reference.md's table holds exactly each stage's `outs`, `metrics` and `plots` in dvc.yaml, and every file
  dvc.yaml's top-level `metrics` and `plots` read is one of them or in the reference's list of other files;
- the config groups docs/experiments.md names are conf/'s group folders, the backends are conf/teacher/'s;
- docs/development.md's code map names every module;
- the minimum Python (pyproject, Makefile, README, ruff) is the lock's: the highest Requires-Python of the pinned
  packages, and the Makefile refuses an older interpreter before creating the venv;
- every figure the docs take from a file is that file's (FIGURES): a re-measured bench fails until the docs follow;
- LICENSE and CITATION.cff agree with pyproject; each bundled data config's license is the one the docs state and
  the dataset card's;
- a missing chromium skips the browser tests with the reason, except in CI, where it fails them.
Each was made to drift once (a stage renamed in the docs, an output added to dvc.yaml, a figure changed in its file,
a module added, `requires-python` back to 3.10) and its test failed naming what differs.
"""

import json
import re
import subprocess
import sys
import tomllib
from importlib import metadata

import pytest
import yaml
from conftest import REPO, REQUIRE_BROWSER, chromium
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

LINK = re.compile(r"\]\(([^)\s]+)\)")
SUMMARY_MARK = "<!-- the output of `nlistral summary` on the committed metrics -->\n```text\n"


def read(name: str) -> str:
    return (REPO / name).read_text(encoding="utf-8")


def heading_ids(text: str) -> set[str]:
    """The ids mkdocs (and GitHub) give a page's headings: lower case, punctuation dropped, spaces -> '-'."""
    ids = set()
    for heading in re.findall(r"(?m)^#{1,6} (.+)$", text):
        ids.add(re.sub(r"[-\s]+", "-", re.sub(r"[^\w\s-]", "", heading.replace("`", "")).strip().lower()))
    return ids


def paragraph(text: str, start: str) -> str:
    """The paragraph of `text` that begins with `start`."""
    index = text.index(start)
    return text[index : text.find("\n\n", index)]


def ticked(text: str) -> list[str]:
    return re.findall(r"`([^`]+)`", text)


def nlistral(*args: str) -> str:
    return subprocess.run([sys.executable, "-m", "nlistral", *args], cwd=REPO, capture_output=True, text=True,
                          check=True).stdout  # fmt: skip


def dvc_stages() -> dict[str, dict]:
    return yaml.safe_load(read("dvc.yaml"))["stages"]


def entry_paths(entries) -> set[str]:
    """The paths of a stage's outs/metrics/plots list, `${item}` as `{split}`, `${key}` as `{set}`."""
    names = {next(iter(e)) if isinstance(e, dict) else e for e in entries or []}
    return {n.replace("${item}", "{split}").replace("${key}", "{set}").replace("${data.dir}", "{data.dir}").rstrip("/")
            for n in names}  # fmt: skip


def test_readme_links_resolve():
    readme = read("README.md")
    broken = []
    for target in LINK.findall(readme):
        if re.match(r"[a-z]+:", target):  # http(s):, mailto:
            continue
        path, _, anchor = target.partition("#")
        page = REPO / path if path else REPO / "README.md"
        if not page.exists() or (anchor and anchor not in heading_ids(page.read_text())):
            broken.append(target)
    assert not broken, f"README.md links to what is not there: {broken}"


def test_the_readme_summary_is_what_nlistral_summary_prints_on_the_committed_metrics():
    """After the metrics are regenerated (or the summary's format changes), paste `nlistral summary`'s output into
    README.md's block."""
    readme = read("README.md")
    assert SUMMARY_MARK in readme, "README.md lost its summary block"
    block = readme.split(SUMMARY_MARK, 1)[1].split("\n```", 1)[0]
    assert block == nlistral("summary").rstrip("\n"), "README.md's summary block is not `nlistral summary`'s output"


def test_the_documented_subcommands_are_the_clis_and_every_stage_runs_one():
    (choices,) = re.findall(r"\{([a-z,-]+)\}", nlistral("--help"))[:1]
    subcommands = set(choices.split(","))
    listed = paragraph(read("docs/experiments.md"), "`nlistral --help` lists its subcommands")
    documented = {word for word in ticked(listed) if re.fullmatch(r"[a-z-]+", word)}
    assert documented == subcommands, (
        f"docs/experiments.md lists {sorted(documented - subcommands)} that `nlistral --help` lacks, "
        f"and lacks {sorted(subcommands - documented)}"
    )
    for name, stage in dvc_stages().items():
        command = stage.get("do", stage)["cmd"].split()
        assert command[0] == "nlistral" and command[1] in subcommands, f"dvc.yaml stage {name}: {command}"


def test_the_readme_and_the_index_list_every_docs_page():
    """Review r4: docs/security.md was in the index and mkdocs' nav but not in the README's table of pages."""
    pages = sorted(p.name for p in (REPO / "docs").glob("*.md") if p.name != "index.md")
    readme = sorted(re.findall(r"^\| \[[^]]+\]\(docs/([\w-]+\.md)\)", read("README.md"), re.M))
    index = sorted(re.findall(r"^\| \[[^]]+\]\(([\w-]+\.md)\)", read("docs/index.md"), re.M))
    nav = sorted(page for entry in yaml.safe_load(read("mkdocs.yml"))["nav"] for page in entry.values())
    assert readme == index == pages and nav == sorted([*pages, "index.md"])


def test_the_documented_timing_keys_are_the_ones_moved_to_metrics_speed():
    from nlistral.paths import SPEED_KEYS

    bullet = paragraph(read("docs/experiments.md"), "- **Timings**").split(") go")[0]
    assert set(re.findall(r"`(\w+)`", bullet)) == SPEED_KEYS


def test_the_readme_dag_names_every_stage():
    dag = read("README.md").split("## The pipeline", 1)[1].split("```", 2)[1]
    missing = [name for name in dvc_stages() if not re.search(rf"\b{name}\b", dag)]
    assert not missing, f"README.md's DAG leaves out the dvc.yaml stages {missing}"


def reference_tables() -> tuple[dict[str, set[str]], set[str]]:
    """docs/reference.md: {stage: paths} of the stage table, and the paths of the table of other files."""
    text = read("docs/reference.md")
    stages_part, other_part = text.split("Written outside the stages", 1)
    stages: dict[str, set[str]] = {}
    for line in re.findall(r"(?m)^\| `.*$", stages_part):
        cells = line.strip("|").split("|")
        stage = ticked(cells[0])[0].split("@")[0]
        stages[stage] = {p.rstrip("/") for cell in cells[1:] for p in ticked(cell) if "/" in p}
    other = {ticked(line)[0].rstrip("/") for line in re.findall(r"(?m)^\| `.*$", other_part.split("\n\n", 2)[1])}
    return stages, other


def test_the_reference_table_is_dvc_yamls_outs_metrics_and_plots():
    documented, _ = reference_tables()
    declared = {
        name: entry_paths(spec.get("outs")) | entry_paths(spec.get("metrics")) | entry_paths(spec.get("plots"))
        for name, stage in dvc_stages().items()
        for spec in [stage.get("do", stage)]
    }
    assert documented.keys() == declared.keys(), "docs/reference.md's stages are not dvc.yaml's"
    differ = {name: (sorted(documented[name] - paths), sorted(paths - documented[name]))
              for name, paths in declared.items() if documented[name] != paths}  # fmt: skip
    assert not differ, f"docs/reference.md vs dvc.yaml, per stage (only in the docs, only in dvc.yaml): {differ}"


def test_every_metrics_and_plots_file_is_a_stage_output_or_in_the_references_other_files():
    _, other = reference_tables()
    params = yaml.safe_load(read("params.yaml"))
    outs = set()
    for stage in dvc_stages().values():
        spec = stage.get("do", stage)
        paths = entry_paths(spec.get("outs")) | entry_paths(spec.get("metrics"))
        for path in paths:
            for split in ("train", "dev", "test"):
                for test_set in params["eval"]["test_sets"] or ["none"]:
                    outs.add(path.replace("{data.dir}", params["data"]["dir"]).format(split=split, set=test_set))
    top = yaml.safe_load(read("dvc.yaml"))
    read_files = set(top["metrics"])
    for plot in top["plots"]:
        (name, spec), = plot.items()  # fmt: skip
        read_files |= set(spec["y"]) if isinstance(spec.get("y"), dict) else {name}
    # a folder (metrics/plots/test_sets) holds stage outputs
    loose = sorted(f for f in read_files if f not in outs | other and not any(o.startswith(f"{f}/") for o in outs))
    assert not loose, f"dvc.yaml's metrics/plots read files no stage writes nor docs/reference.md names: {loose}"


def test_the_config_groups_and_backends_are_conf_folders():
    groups = paragraph(read("docs/experiments.md"), "`conf/` is the one config tree").split("plus the groups", 1)[1]
    documented = set(ticked(groups.split(".", 1)[0]))
    # conf/llm holds what the teacher/reflector options inherit and conf/model/base the model options' base: not groups
    folders = {p.name for p in (REPO / "conf").iterdir() if p.is_dir()} - {"llm"}
    assert documented == folders, f"docs/experiments.md's groups {sorted(documented)} vs conf/ {sorted(folders)}"
    backends = set(ticked(read("docs/real-setup.md").split("backends ", 1)[1].split("(", 1)[0]))
    for role in ("teacher", "reflector"):
        assert backends == {p.stem for p in (REPO / "conf" / role).glob("*.yaml")}, f"conf/{role}/ vs the docs"
    row = next(line for line in read("README.md").splitlines() if line.startswith("| teacher, reflector |"))
    in_readme = {word for word in ticked(row) if "=" not in word}
    assert in_readme == backends, f"README.md's teacher/reflector row names {sorted(in_readme)}"


def test_the_code_map_names_every_module():
    layout = read("docs/development.md").split("## Layout", 1)[1].split("```", 2)[1]
    package = REPO / "src/nlistral"
    modules = [p.name for p in package.glob("*.py") if not p.name.startswith("__")]
    modules += [f"{p.name}/" for p in package.iterdir() if p.is_dir() and not p.name.startswith("__")]
    stages = [p.stem for p in (package / "stages").glob("*.py") if not p.name.startswith("__")]
    missing = [m for m in modules if m not in layout] + [s for s in stages if not re.search(rf"\b{s}\b", layout)]
    assert not missing, f"docs/development.md's code map leaves out {missing}"


def lock_minimum_python() -> str:
    """The lowest CPython 3.x every package pinned in requirements.txt accepts (its installed dist-info's
    Requires-Python): numpy 2.4.6, pandas 3.1.1, scipy 1.17.1... need 3.11."""
    specifiers = []
    for line in read("requirements.txt").splitlines():
        if not line or line[0] in "# ":
            continue
        requirement = Requirement(line)
        if requirement.marker and not requirement.marker.evaluate():
            continue
        installed = metadata.metadata(requirement.name)
        assert requirement.specifier.contains(installed["Version"].split("+")[0]), f"the venv is not the lock: {line}"
        specifiers.append(SpecifierSet(installed.get("Requires-Python") or ""))
    accepted = [m for m in range(8, 20) if all(s.contains(f"3.{m}.0") for s in specifiers)]
    assert accepted, "no Python 3 version satisfies every pinned package"
    return f"3.{accepted[0]}"


def test_the_minimum_python_is_the_locks_everywhere():
    minimum = lock_minimum_python()
    pyproject = tomllib.loads(read("pyproject.toml"))
    assert pyproject["project"]["requires-python"] == f">={minimum}"
    assert pyproject["tool"]["ruff"]["target-version"] == f"py{minimum.replace('.', '')}"
    assert f"Needs Python {minimum}" in read("README.md")
    major, minor = minimum.split(".")
    assert f"sys.version_info >= ({major}, {minor})" in read("Makefile")


def test_the_makefile_refuses_an_older_python_before_creating_the_venv(tmp_path):
    """A 3.10 interpreter would create the venv and fail minutes later inside pip on numpy's Requires-Python."""
    for name in ("Makefile", "requirements.txt", "constraints.txt", "pyproject.toml"):
        (tmp_path / name).write_bytes((REPO / name).read_bytes())
    fake = tmp_path / "python3.10"  # this interpreter, reporting 3.10.14
    fake.write_text(f"#!/bin/sh\nexec {sys.executable} -c 'import sys; sys.version_info = (3, 10, 14); "
                    "sys.version = \"3.10.14\"; exec(sys.argv[1])' \"$2\"\n")  # fmt: skip
    fake.chmod(0o755)
    done = subprocess.run(["make", "-C", str(tmp_path), ".venv/.installed", f"PYTHON={fake}"], capture_output=True,
                          text=True)  # fmt: skip
    assert done.returncode != 0 and f"NLIstral needs Python >= 3.11; {fake} is 3.10.14" in done.stderr
    assert not (tmp_path / ".venv").exists()


def figure_sources() -> list[tuple[str, str, str, object]]:
    """(page, the text as the page writes it, source file, the value in that file): each page's text must be the
    file's value so formatted."""
    train = json.loads(read("metrics/train.json"))
    tokens = json.loads(read("bench/results/token-count.json"))
    gpu = json.loads(read("bench/results/gpu-h200.json"))
    rows = {split: len(read(f"data/sample/{split}.csv").splitlines()) - 1 for split in ("train", "dev", "test")}
    ratio = tokens["per_prompt_ratio"]
    formats = json.loads(read("bench/results/formats-cpu.json"))
    runs, padded = formats["results"], formats["padded_cot_training"]
    scored, generated, first = (runs[k]["samples_per_s"] for k in ("label_only (likelihood)", "label_only",
                                                                    "label_first"))  # fmt: skip
    agree = runs["label_only (likelihood)"]
    pipeline = json.loads(read("bench/results/pipeline-time.json"))
    return [
        ("README.md", "took {:.0f} s (`bench/results/pipeline-time.json`", "bench/results/pipeline-time.json",
         pipeline["wall_s"]),
        # review r4: total_params counts the LoRA adapter too; the model base_model builds is the rest
        ("README.md", "a {:,}-parameter", "metrics/train.json", train["total_params"] - train["trainable_params"]),
        ("README.md", "trained for {} steps", "metrics/train.json", train["steps"]),
        ("README.md", "({} train / {} dev / {} test)", "data/sample/*.csv", (rows["train"], rows["dev"], rows["test"])),
        ("docs/real-setup.md", "gives {:.1%} more tokens than Tekken", "bench/results/token-count.json",
         tokens["approx_tokens"] / tokens["tekken_tokens"] - 1),
        ("docs/real-setup.md", "(per prompt {:+.1%} to {:+.1%})", "bench/results/token-count.json",
         (ratio["min"] - 1, ratio["max"] - 1)),
        ("docs/real-setup.md", "`python bench/gpu.py --steps {}`", "bench/results/gpu-h200.json",
         gpu["train"]["timed_steps"]),
        ("docs/real-setup.md", "{:.2f}B parameters)", "bench/results/gpu-h200.json", gpu["base"]["parameters"] / 1e9),
        ("docs/real-setup.md", "on rows of {:.0f} tokens on average", "bench/results/gpu-h200.json",
         gpu["train"]["mean_row_tokens"]),
        ("docs/real-setup.md", "| build in bfloat16 on the GPU + save | {} s |", "bench/results/gpu-h200.json",
         gpu["base"]["build_and_save_s"]),
        ("docs/real-setup.md", "| {} s/step, {:,.0f} tokens/s, {:.1f} rows/s |", "bench/results/gpu-h200.json",
         (gpu["train"]["s_per_step"], gpu["train"]["tokens_per_s"], gpu["train"]["samples_per_s"])),
        ("docs/real-setup.md", "| {} GiB allocated, {} GiB reserved |", "bench/results/gpu-h200.json",
         (gpu["train"]["peak_gpu_allocated_gib"], gpu["train"]["peak_gpu_reserved_gib"])),
        ("docs/real-setup.md", "| {} rows/s, {:.0f} tokens/s ({} GiB) |", "bench/results/gpu-h200.json",
         (gpu["generate_hf"]["samples_per_s"], gpu["generate_hf"]["output_tokens_per_s"],
          gpu["generate_hf"]["peak_gpu_allocated_gib"])),
        ("docs/evaluation.md", "generation on {} of {} rows", "bench/results/formats-cpu.txt",
         (round(agree["labels_equal_generation"] * agree["n"]), agree["n"])),
        ("docs/evaluation.md", "at {:.0f} samples/s against {:.0f}", "bench/results/formats-cpu.txt",
         (scored, generated)),
        ("docs/evaluation.md", "and {:.0f} (label_first generation): {:.1f}× and {:.1f}×",
         "bench/results/formats-cpu.txt", (first, scored / generated, scored / first)),
        ("docs/evaluation.md", "the same adapter, {:.0f} tokens a row", "bench/results/formats-cpu.txt",
         runs["label_only"]["output_tokens_per_row"]),
        ("docs/training.md", "padded batches were {:.1%} padding ({:,} positions for {:,} tokens)",
         "bench/results/formats-cpu.json",
         (padded["pad_token_share"], padded["positions_processed"], padded["tokens_processed"])),
        ("docs/training.md", "({:,.0f} padded against {:,.0f} padding-free)", "bench/results/formats-cpu.json",
         (padded["tokens_per_second"], runs["cot"]["train"]["tokens_per_second"])),
        *coverage_rows(),
    ]  # fmt: skip


def coverage_rows() -> list[tuple[str, str, str, object]]:
    """Every table row of bench/results/coverage.md, on the page that shows its section (the seeds table in
    docs/experiments.md, the rest in docs/evaluation.md). Review r3: the page cited the file with no check."""
    found = []
    for section in read("bench/results/coverage.md").split("\n## ")[1:]:
        page = "docs/experiments.md" if section.startswith("Across seeds") else "docs/evaluation.md"
        found += [(page, "{}", "bench/results/coverage.md", line) for line in section.splitlines()
                  if re.match(r"\| [0-9]", line)]  # fmt: skip
    return found


def test_every_figure_taken_from_a_file_is_that_files():
    """A figure with its source named: the page writes what the file holds (re-measure, then update the page)."""
    stale = []
    for page, template, source, value in figure_sources():
        text = template.format(*value) if isinstance(value, tuple) else template.format(value)
        if text not in " ".join(read(page).split()):  # as a reader sees it: line breaks are spaces
            stale.append(f"{page}: expected {text!r} from {source}")
    assert not stale, "\n".join(stale)
    cited = {(page, source) for page, _, source, _ in figure_sources()}
    for page in ["README.md", *(f"docs/{p.name}" for p in sorted((REPO / "docs").glob("*.md")))]:
        for source in set(re.findall(r"bench/results/[\w.-]+", read(page))):
            assert (page, source) in cited, f"{page} cites {source}: add its figures to figure_sources()"


def test_license_and_citation_agree_with_pyproject():
    pyproject = tomllib.loads(read("pyproject.toml"))["project"]
    citation = yaml.safe_load(read("CITATION.cff"))
    assert pyproject["license"]["text"] == citation["license"] == "MIT" and read("LICENSE").startswith("MIT License")
    assert str(citation["version"]) == pyproject["version"]
    assert "https://github.com/j-d0g/mistral-7b-nli" in [r["url"] for r in citation["references"]]
    assert "https://github.com/j-d0g/mistral-7b-nli" in read("README.md")  # the study, linked from the entrance


@pytest.mark.parametrize("data", sorted(p.stem for p in (REPO / "conf/data").glob("*.yaml")))
def test_each_data_configs_license_is_the_documented_one_and_reaches_the_dataset_card(data):
    from nlistral.config import compose_params
    from nlistral.stages.report import dataset_card_metadata

    cfg = yaml.safe_load(compose_params([f"data={data}"], conf_dir=REPO / "conf"))
    license_ = cfg["data"].get("license")
    stated = paragraph(read("docs/real-setup.md"), "The cards take their `license` from the config")
    assert (f"`{data}`: {license_}" if license_ else f"`{data}` leaves it unset") in " ".join(stated.split())
    assert yaml.safe_load(dataset_card_metadata({"cfg": cfg}))["license"] == (license_ or "other")


def test_without_chromium_browser_tests_skip_except_in_ci(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv(REQUIRE_BROWSER, raising=False)
    with pytest.raises(pytest.skip.Exception, match="make browser"):
        chromium()
    monkeypatch.setenv(REQUIRE_BROWSER, "1")
    with pytest.raises(pytest.fail.Exception, match="make browser"):
        chromium()
    assert f"export {REQUIRE_BROWSER}=1" in read(".ci/run")


def test_the_documented_generalisation_family_is_the_one_the_report_adjusts_over():
    """Review r3: docs/evaluation.md said `experiment=generalisation` makes 8 sets and a family of 18; it composes 7
    extra sets (the diagnostic one and six from the hub), so `headline_family` adjusts over 2 x (1 + 7) = 16."""
    from nlistral.config import compose_params
    from nlistral.results import headline_family

    sets = yaml.safe_load(compose_params(["experiment=generalisation"], conf_dir=REPO / "conf"))["eval"]["test_sets"]
    found = re.search(r"`experiment=generalisation`, (\d+) extra sets: (\d+)\)", read("docs/evaluation.md"))
    assert found, "the family size of experiment=generalisation is no longer stated in docs/evaluation.md"
    both = {"base": {"mcnemar_midp": 0.5}, "teacher": {"mcnemar_midp": 0.5}}
    size = headline_family(both, {name: {"comparisons": both} for name in sets})["size"]
    assert (int(found[1]), int(found[2])) == (len(sets), size) == (7, 16)
