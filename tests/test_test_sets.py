"""Extra test sets (eval.test_sets): a tagged CSV and a `datasets` folder, every model on each (in-process, tiny model),
per-tag accuracy, the summary's comparisons, the ready configs, and bad sets failing clearly."""

import csv
import json
import shutil

import datasets
import pytest
from conftest import REPO, paired_by_hand

from nlistral import cli
from nlistral.config import compose_params, load_config
from nlistral.io import read_jsonl, read_metrics
from nlistral.stages import evaluate_set, summarise_set

CSV_ROWS = [  # id, premise, hypothesis, label, phenomenon
    ("n1", "The lamp is not on.", "The lamp is on.", 0, "negation"),
    ("n2", "Nobody is in the room.", "Someone is in the room.", 0, "negation"),
    ("n3", "She did not forget the keys.", "She remembered the keys.", 1, "negation"),
    ("q1", "All the doors are shut.", "Some doors are shut.", 1, "quantifiers"),
    ("q2", "Some guests left early.", "All guests left early.", 0, "quantifiers"),
]
HANS_LIKE = {  # HANS's columns and its two-class ClassLabel
    "premise": ["The doctor paid the actor.", "The judge near the lawyer slept.", "The artist sang.",
                "The banker saw the tourist.", "Maybe the poet danced.", "The clerk ran quickly."],
    "hypothesis": ["The actor paid the doctor.", "The lawyer slept.", "The artist sang.",
                   "The banker saw someone.", "The poet danced.", "The clerk ran."],
    "label": [1, 1, 0, 0, 1, 0],
    "heuristic": ["lexical_overlap", "subsequence", "lexical_overlap", "lexical_overlap", "constituent",
                  "subsequence"],
}  # fmt: skip
HANS_FEATURES = datasets.Features({
    "premise": datasets.Value("string"), "hypothesis": datasets.Value("string"),
    "label": datasets.ClassLabel(names=["entailment", "non-entailment"]), "heuristic": datasets.Value("string"),
})  # fmt: skip
SETS = {"tagged": {"path": "sets/tagged.csv", "watch": "sets/tagged.csv", "tags": ["phenomenon"], "limit": None},
        "hanslike": {"path": "sets/hanslike", "watch": "sets/hanslike", "config": None, "revision": None,
                     "split": "validation", "limit": None, "tags": ["heuristic"],
                     "columns": {"premise": "premise", "hypothesis": "hypothesis", "label": "label", "id": None},
                     "labels": {"entailment": 1, "non-entailment": 0}}}  # fmt: skip


def write_sets(root):
    (root / "sets").mkdir()
    with open(root / "sets" / "tagged.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([("id", "premise", "hypothesis", "label", "phenomenon"), *CSV_ROWS])
    datasets.DatasetDict({"validation": datasets.Dataset.from_dict(HANS_LIKE, features=HANS_FEATURES)}).save_to_disk(
        root / "sets" / "hanslike"
    )


def hydra_value(value) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {hydra_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(map(hydra_value, value)) + "]"
    return "null" if value is None else f"'{value}'" if isinstance(value, str) else str(value)


def set_overrides(**sets) -> list[str]:
    """`nlistral` overrides adding `sets` to eval.test_sets (Hydra's grammar: {key: value, ...}), small and fast."""
    added = [f"+eval.test_sets.{name}={hydra_value(spec)}" for name, spec in sets.items()]
    return added + ["eval.max_new_tokens=24", "eval.allow_short_max_new_tokens=true", "eval.batch_size=8",
                    "eval.bootstrap=1000", "model.load_in_4bit=false"]  # fmt: skip


@pytest.fixture(scope="module")
def evaluated(built_base, tmp_path_factory):
    """Both sets through all three models and the summary, with a LoRA adapter on the tiny base whose weights are
    random, not PEFT's zero B matrix: an all-zero adapter answers exactly as the base does, so a stage that ignored
    the adapter would pass unseen."""
    from peft import LoraConfig, get_peft_model

    from nlistral.model import load_base_model

    root = tmp_path_factory.mktemp("sets")
    shutil.copytree(REPO / "conf", root / "conf")
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    shutil.copytree(built_base, root / "models" / "base")
    write_sets(root)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("HF_DATASETS_CACHE", str(root / ".cache" / "datasets"))
        mp.setenv("NLISTRAL_CACHE_DIR", str(root / ".cache" / "llm"))
        cfg = load_config(set_overrides(**SETS))
        adapter = get_peft_model(
            load_base_model(cfg), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        )
        adapter.save_pretrained(root / "models" / "adapter")
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
            if (built_base / name).is_file():
                shutil.copy(built_base / name, root / "models" / "adapter" / name)
        metrics = {(s, m): evaluate_set.run(cfg, s, m) for s in SETS for m in evaluate_set.MODELS}
        summaries = {s: summarise_set.run(cfg, s) for s in SETS}
    return root, cfg, metrics, summaries


def test_every_model_is_scored_on_every_set_with_the_rows_tags(evaluated):
    root, _, metrics, summaries = evaluated
    for name, n in (("tagged", 5), ("hanslike", 6)):
        for model, (predictions, _) in {"fine-tuned": ("predictions", 0), "base": ("predictions_base", 0),
                                        "teacher": ("predictions_teacher", 0)}.items():  # fmt: skip
            records = read_jsonl(root / f"metrics/test_sets/{name}/{predictions}.jsonl")
            assert len(records) == n and metrics[name, model]["n"] == n and metrics[name, model]["set"] == name
            assert metrics[name, model]["accuracy"] == round(sum(r["correct"] for r in records) / n, 4)
            written = read_metrics(root / f"metrics/test_sets/{name}/eval{predictions[11:]}.json")  # with timings
            assert written == metrics[name, model]
        summary = json.loads((root / f"metrics/test_sets/{name}.json").read_text())
        assert summary == summaries[name] and set(summary["models"]) == {"fine-tuned", "base", "teacher"}
    tagged = read_jsonl(root / "metrics/test_sets/tagged/predictions_teacher.jsonl")
    assert [(r["id"], r["true_label"], r["tags"]) for r in tagged] == [(i, y, {"phenomenon": t})
                                                                       for i, _, _, y, t in CSV_ROWS]  # fmt: skip
    hans = read_jsonl(root / "metrics/test_sets/hanslike/predictions_teacher.jsonl")
    # ClassLabel 0 = entailment -> 1, 1 = non-entailment -> 0; ids are the source row index
    assert [(r["id"], r["true_label"]) for r in hans] == [("0", 0), ("1", 0), ("2", 1), ("3", 1), ("4", 0), ("5", 1)]
    assert [r["tags"]["heuristic"] for r in hans] == HANS_LIKE["heuristic"]


def test_the_fine_tuned_model_answers_with_its_adapter_and_the_base_without(evaluated):
    """Catches `evaluate-set --model fine-tuned` scoring the base model (the adapter never loaded): the fixture's
    adapter has non-zero weights, so its greedy outputs differ from the base's on every row of both sets."""
    root, *_ = evaluated
    for name in SETS:
        tuned, base = (
            read_jsonl(root / f"metrics/test_sets/{name}/{f}.jsonl") for f in ("predictions", "predictions_base")
        )
        assert [r["id"] for r in tuned] == [r["id"] for r in base]
        same = [t["id"] for t, b in zip(tuned, base, strict=True) if t["output"] == b["output"]]
        assert not same, f"{name}: fine-tuned and base gave the same output on rows {same}"


def test_per_tag_accuracy_is_the_hand_count():
    hand = [(True, "negation"), (False, "negation"), (True, "negation"), (False, "numbers"), (True, "word_order")]
    records = [{"correct": c, "tags": {"phenomenon": t}} for c, t in hand]
    table = summarise_set.by_tag(records, ["phenomenon"])["phenomenon"]
    assert {value: (cell["n"], cell["accuracy"]) for value, cell in table.items()} == {
        "negation": (3, 0.6667), "numbers": (1, 0.0), "word_order": (1, 1.0)}  # fmt: skip
    assert table["numbers"]["accuracy_ci95"] == [0.0, 0.975]  # Clopper-Pearson: 0 of 1 right is no certainty


def test_the_summary_counts_each_tag_and_pairs_each_baseline(evaluated):
    root, cfg, _, summaries = evaluated
    tuned = read_jsonl(root / "metrics/test_sets/hanslike/predictions.jsonl")
    for model, suffix in (("fine-tuned", ""), ("base", "_base"), ("teacher", "_teacher")):
        records = read_jsonl(root / f"metrics/test_sets/hanslike/predictions{suffix}.jsonl")
        by_tag = summaries["hanslike"]["models"][model]["by_tag"]["heuristic"]
        assert list(by_tag) == ["constituent", "lexical_overlap", "subsequence"]
        for value, cell in by_tag.items():
            rows = [r for r in records if r["tags"]["heuristic"] == value]
            assert cell["n"] == len(rows) and cell["accuracy"] == round(sum(r["correct"] for r in rows) / len(rows), 4)
        if model != "fine-tuned":
            expected = paired_by_hand(records, tuned, model, "fine-tuned", cfg.eval.bootstrap, cfg.eval.seed)
            assert summaries["hanslike"]["comparisons"][model] == expected  # by hand: not compare_records itself
    assert summaries["tagged"]["models"]["teacher"]["by_tag"]["phenomenon"]["negation"]["n"] == 3


def test_summarise_prints_the_per_tag_table(evaluated, capsys):
    root, cfg, _, _ = evaluated
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        summary = summarise_set.run(cfg, "tagged")
    out = capsys.readouterr().out
    teacher = summary["models"]["teacher"]["by_tag"]["phenomenon"]["quantifiers"]["accuracy"]
    assert "summarise-set tagged (5 rows)" in out and f"{teacher:.4f}" in out.split("quantifiers")[1].splitlines()[0]


@pytest.mark.parametrize(
    ("change", "message"),
    [({"tags": ["topic"]}, "sets/tagged.csv:1: column 'topic': missing from the header"),
     ({"tags": ["label"]}, "sets/tagged.csv:1: column 'label': is a data column, not a tag column"),
     ({"path": "sets/absent.csv"}, "sets/absent.csv: cannot read file")],
)  # fmt: skip
def test_a_bad_csv_set_is_a_clear_error_and_writes_nothing(workdir, capsys, change, message):
    write_sets(workdir)
    bad = {"bad": SETS["tagged"] | change}
    assert cli.main(["evaluate-set", "--set", "bad", "--model", "teacher", *set_overrides(**bad)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"nlistral evaluate-set: error: {message}")
    assert not (workdir / "metrics").exists()


def test_an_unknown_set_or_unmapped_label_is_a_clear_error(workdir, capsys, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(workdir / ".cache" / "datasets"))
    write_sets(workdir)
    assert cli.main(["evaluate-set", "--set", "mnli", "--model", "base", *set_overrides(**SETS)]) == 2
    assert "eval.test_sets has no set 'mnli' (has: diagnostic, tagged, hanslike)" in capsys.readouterr().err
    unmapped = {"hanslike": SETS["hanslike"] | {"labels": {"entailment": 1}}}
    assert cli.main(["evaluate-set", "--set", "hanslike", "--model", "teacher", *set_overrides(**unmapped)]) == 2
    assert "label 'non-entailment' is not in eval.test_sets.hanslike.labels" in capsys.readouterr().err
    assert not (workdir / "metrics").exists()


def test_ready_configs_compose_with_binary_label_maps():
    composed = compose_params(["experiment=generalisation"], conf_dir=REPO / "conf")
    sets = __import__("yaml").safe_load(composed)["eval"]["test_sets"]
    assert list(sets) == ["diagnostic", "mnli_matched", "mnli_mismatched", "anli_r1", "anli_r2", "anli_r3", "hans"]
    assert sets["hans"]["tags"] == ["heuristic", "subcase"]
    assert sets["hans"]["labels"] == {"entailment": 1, "non-entailment": 0}
    for name, spec in sets.items():
        assert set(spec.get("labels", {"x": 0}).values()) <= {0, 1}, name
        assert spec["watch"] in (spec["path"], f"conf/test_set/{name}.yaml"), name
    assert [sets[f"anli_r{r}"]["split"] for r in (1, 2, 3)] == ["test_r1", "test_r2", "test_r3"]


def test_the_diagnostic_set_is_tagged_and_balanced_enough():
    from nlistral.data import read_csv

    rows = read_csv(REPO / "data" / "sample" / "diagnostic.csv", ["phenomenon"])
    counts = rows.groupby("phenomenon").size().to_dict()
    assert counts == {t: 6 for t in ("hypernym_hyponym", "lexical_overlap", "negation", "numbers", "quantifiers",
                                     "word_order")}  # fmt: skip
    assert set(rows[rows.phenomenon == "lexical_overlap"].label) == {0}  # overlap without entailment
