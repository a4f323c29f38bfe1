"""The CSV input contract: what loads, and the message every kind of bad file gets."""

from pathlib import Path

import pytest

from nlistral.data import DataError, load_split, read_csv

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
HEADER = "id,premise,hypothesis,label\n"
ROW = "a,A dog runs.,An animal runs.,1\n"
GOOD = ROW + "b,A cat sleeps.,A cat is awake.,0\n"


def write(tmp_path, text, split="train"):
    data = text.encode("utf-8") if isinstance(text, str) else text
    (tmp_path / f"{split}.csv").write_bytes(data)
    return tmp_path


def error_of(tmp_path, text) -> str:
    with pytest.raises(DataError) as info:
        load_split(write(tmp_path, text), "train")
    return str(info.value)


@pytest.mark.parametrize(
    ("text", "line", "column", "problem"),
    [
        (HEADER + GOOD + "c,A man sits.,A man stands.,2\n", 4, "label", "expected 0 or 1, got '2'"),
        (HEADER + GOOD + "c,A man sits.,A man stands.,-1\n", 4, "label", "got '-1'"),
        (HEADER + "c,A man sits.,A man stands.,yes\n", 2, "label", "got 'yes'"),
        (HEADER + "c,A man sits.,A man stands.,1.0\n", 2, "label", "got '1.0'"),
        (HEADER + "c,A man sits.,A man stands.,\n", 2, "label", "got ''"),
        (HEADER + "c,,A man stands.,1\n", 2, "premise", "empty value"),
        (HEADER + GOOD + "c,A man sits.,   ,1\n", 4, "hypothesis", "empty value"),
        (HEADER + " ,A man sits.,A man stands.,1\n", 2, "id", "empty value"),
        (HEADER + GOOD + "a,A man sits.,A man stands.,1\n", 4, "id", "duplicate id 'a' (first on line 2)"),
        ("id,premise,label\n" + "a,A man sits.,1\n", 1, "hypothesis", "missing from the header"),
        ("id,premise,hypothesis,label,label\n" + "a,A,B,1,1\n", 1, "label", "more than once"),
    ],
)
def test_bad_value_names_file_line_and_column(tmp_path, text, line, column, problem):
    message = error_of(tmp_path, text)
    assert message.startswith(f"{tmp_path / 'train.csv'}:{line}: column '{column}': ")
    assert problem in message


def test_line_number_is_where_a_multiline_record_starts(tmp_path):
    text = HEADER + 'a,"A dog\nruns\nfast.",An animal runs.,1\n\nb,"A cat\nsleeps.",A cat naps.,maybe\n'
    assert error_of(tmp_path, text).endswith(":6: column 'label': expected 0 or 1, got 'maybe'")


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "empty file (no header)"),
        ("\n\n", "empty file (no header)"),
        (HEADER, "no data rows after the header"),
    ],
)
def test_empty_file(tmp_path, text, problem):
    assert error_of(tmp_path, text) == f"{tmp_path / 'train.csv'}: {problem}"


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"dev\.csv: cannot read file \(No such file or directory\)"):
        load_split(tmp_path, "dev")


def test_not_utf8_names_the_line(tmp_path):
    text = (HEADER + GOOD).encode() + "c,Un caf\xe9 ouvert.,A cafe is open.,1\n".encode("latin-1")
    assert error_of(tmp_path, text) == f"{tmp_path / 'train.csv'}:4: not valid UTF-8 (byte 0xe9)"


def test_wrong_field_count_and_unclosed_quote(tmp_path):
    unquoted_comma = HEADER + ROW + "c,A man, a dog,B,1\n"
    assert ":3: expected 4 fields like the header, got 5" in error_of(tmp_path, unquoted_comma)
    assert ":3: malformed CSV (unexpected end of data)" in error_of(tmp_path, HEADER + ROW + 'c,"A man,B,1\n')


def test_bom_quoted_newline_extra_columns_and_exact_text(tmp_path):
    text = "\ufeffsource,premise,id,hypothesis,label,label3\n" + 'x," Two\n dogs play. ",d1,Dogs play.,1,entailment\n'
    df = load_split(write(tmp_path, text), "train")
    assert list(df.columns) == ["id", "premise", "hypothesis", "label"]
    row = {"id": "d1", "premise": " Two\n dogs play. ", "hypothesis": "Dogs play.", "label": 1}
    assert df.to_dict("records") == [row]


def test_optional_id_defaults_to_row_index(tmp_path):
    df = load_split(write(tmp_path, "premise,hypothesis,label\nA,B,1\nC,D, 0 \n"), "train")
    assert df["id"].tolist() == ["0", "1"]
    assert df["label"].tolist() == [1, 0]


def test_bundled_sample_data():
    splits = {split: load_split(REPO / "data" / "sample", split) for split in ("train", "dev", "test")}
    assert {split: len(df) for split, df in splits.items()} == {"train": 128, "dev": 44, "test": 44}
    for df in splits.values():
        assert 0.4 <= df["label"].mean() <= 0.6
    ids = [i for df in splits.values() for i in df["id"]]
    pairs = [pair for df in splits.values() for pair in zip(df["premise"], df["hypothesis"], strict=True)]
    assert len(set(ids)) == len(ids)
    assert len(set(pairs)) == len(pairs)


def test_real_esnli_dev_loads():
    if not (SHARED_DATA / "esnli" / "dev.csv").exists():
        pytest.skip("shared e-SNLI data not available")
    df = load_split(SHARED_DATA / "esnli", "dev")
    assert len(df) == 9842
    assert set(df["label"]) == {0, 1}


@pytest.mark.parametrize(
    ("text", "tags", "message"),
    [
        (HEADER + GOOD, ("label",), "1: column 'label': is a data column, not a tag column"),
        (HEADER + GOOD, ("id",), "1: column 'id': is a data column, not a tag column"),
        ("id,premise,premise,hypothesis,label\n", (), "1: column 'premise': appears more than once in the header"),
        ("id,id,premise,hypothesis,label\n", (), "1: column 'id': appears more than once in the header"),
        (HEADER + GOOD, ("topic",), "1: column 'topic': missing from the header (found: id, premise, hypothesis, "
         "label)"),
        (HEADER + "c,A man, a dog,B,1\n", (), "2: expected 4 fields like the header, got 5"),
        ('"id,premise,hypothesis,label\n', (), "1: malformed CSV (unexpected end of data)"),
        (HEADER + "c,,B,1\n", (), "2: column 'premise': empty value"),
    ],
)  # fmt: skip
def test_each_bad_file_error_is_the_whole_message(tmp_path, text, tags, message):
    """Path, line, column and problem, the whole message (survivors of `make mutation` changed parts of these)."""
    path = write(tmp_path, text) / "train.csv"
    with pytest.raises(DataError) as info:
        read_csv(path, tags)
    assert str(info.value) == f"{path}:{message}"


def test_crlf_inside_a_quoted_field_is_kept_and_columns_come_in_order(tmp_path):
    """Text is kept exactly, a Windows line end inside quotes too (newline="" in the reader), and without an id
    column the frame still reads id, premise, hypothesis, label."""
    df = load_split(write(tmp_path, 'premise,hypothesis,label\r\n"Two\r\ndogs.",Dogs.,1\r\n'), "train")
    assert list(df.columns) == ["id", "premise", "hypothesis", "label"]
    assert df.to_dict("records") == [{"id": "0", "premise": "Two\r\ndogs.", "hypothesis": "Dogs.", "label": 1}]
