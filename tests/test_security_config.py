"""An override's value never appears in an error (issue 31, item 10): a key pasted into the wrong override
(`teacher.api_key=sk-...`) must not be printed to the terminal, CI logs or a DVC queue's log.

Bugs these catch, seen failing on main: Hydra's own error, passed through by `compose_params`, said
`use +teacher.api_key=sk-live-...`; the stage path's unknown-key error did the same; so did a grammar error and an
unknown group option. (A known key's wrong value is quoted by the schema, by design: tests/test_schema.py.)
"""

import pytest

from nlistral import cli

SECRET = "sk-live-abcdef123456"


@pytest.mark.parametrize("command", [["params"], ["thoughts", "--split", "train"]])
@pytest.mark.parametrize(("override", "key"), [
    (f"teacher.api_key={SECRET}", "teacher.api_key"),
    (f"+teacher.api_key={SECRET}x]", "teacher.api_key"),
    (f"teacher.model=[{SECRET}", "teacher.model"),
    (f"+teacher={SECRET}", "teacher"),
])  # fmt: skip
def test_an_override_error_names_the_key_never_the_value(workdir, capsys, command, override, key):
    assert cli.main([*command, override]) == 2
    out, err = capsys.readouterr()
    assert SECRET not in out + err and SECRET[3:11] not in out + err
    assert key in err, err
