"""A damaged newest checkpoint does not block every re-run (issue 31, item 8).

Bug this catches, seen failing on main: training killed after checkpoint-4 whose optimizer.pt was then cut short
(a kill during a copy, a full disk): every re-run resumed from it and died in torch.load (`PytorchStreamReader
failed reading zip archive`, exit 1); none fell back to checkpoint-2.
"""

import pytest
from test_model_stages import make_cfg
from test_train import FP32, Killed, base, repo_copy  # noqa: F401 (base: the module fixture this test uses)

from nlistral.stages import train
from nlistral.trainer import EvaluateAtEnd


def test_a_damaged_newest_checkpoint_is_passed_over_for_the_one_before(base, tmp_path, monkeypatch, capsys):  # noqa: F811
    root = repo_copy(base, tmp_path)
    monkeypatch.chdir(root)
    cfg = make_cfg(**FP32)

    def crash_at_4(self, args, state, control, **kwargs):
        if state.global_step == 4:
            raise Killed(state.global_step)

    with monkeypatch.context() as mp:
        mp.setattr(EvaluateAtEnd, "on_save", crash_at_4, raising=False)
        with pytest.raises(Killed):
            train.run(cfg)
    run_dir = root / train.CHECKPOINTS / train.fingerprint(cfg)
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    optimizer = run_dir / "checkpoint-4" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[: optimizer.stat().st_size // 2])

    metrics = train.run(cfg)
    assert metrics["resumed_from_step"] == 2 and metrics["steps"] == 6
    out = capsys.readouterr().out
    here = train.CHECKPOINTS / train.fingerprint(cfg)  # as the stage names it, relative to the repo root
    assert f"not resuming from {here / 'checkpoint-4'}, it is damaged (optimizer.pt:" in out
    assert f"resuming from {here / 'checkpoint-2'} (step 2)" in out
