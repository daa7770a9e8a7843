"""``make demo`` starts fresh each time (issue `newcomer`): an earlier demo run in its workdir is deleted,
anything that is not a run is left alone, and the training command line is what DEMOS says."""
import sys

import pytest

from iclm_jax import demo


def _exec(monkeypatch, *args):
    seen = {}
    monkeypatch.setattr(sys, "argv", ["demo", *args])
    monkeypatch.setattr(demo.os, "execv", lambda exe, argv: seen.setdefault("argv", argv))
    demo.run()
    return seen["argv"]


@pytest.mark.parametrize("iclm", [False, True])
def test_an_earlier_demo_run_is_replaced(tmp_path, monkeypatch, capsys, iclm):
    work = tmp_path / "demo"
    (work / "checkpoints" / "1600").mkdir(parents=True)
    (work / "config.json").write_text("{}")
    argv = _exec(monkeypatch, *(["--iclm"] if iclm else []), f"--workdir={work}", "--config.train.steps=5")
    assert not work.exists()
    assert "starting fresh, deleting the earlier demo run" in capsys.readouterr().err
    assert argv[1:3] == ["-m", "iclm_jax.main"] and argv[-2:] == [f"--workdir={work}", "--config.train.steps=5"]
    assert any(a.endswith(":cpu" if iclm else ":cpu,baseline,symbolic,short") for a in argv)


def test_a_directory_that_is_not_a_run_is_left_alone(tmp_path, monkeypatch):
    work = tmp_path / "mine"
    work.mkdir()
    (work / "notes.txt").write_text("keep")
    _exec(monkeypatch, f"--workdir={work}")
    assert (work / "notes.txt").read_text() == "keep"
