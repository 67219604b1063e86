"""quickstart.py: every stage command is a valid command of its script, complete stages are skipped, a checkpoint
short of its max_iters resumes (the stages themselves are tested in their own files)."""

import importlib
import os

import pytest

import quickstart as qs
from checkpoint import save_checkpoint
from common import parse_config


@pytest.mark.parametrize("preset", ["synthfaces", "tiny"])
def test_every_stage_command_parses_with_its_script_config(preset, tmp_path):
    cfg = parse_config(qs.Config, qs.PRESETS, [f"--preset={preset}", f"--out_dir={tmp_path}"])
    for name, command, _ in qs.stages(cfg):
        argv = command[3:] if command[1] == "-m" else command[2:]
        script = command[2] if command[1] == "-m" else command[1].removesuffix(".py")
        module = importlib.import_module(script)
        parse_config(module.Config, module.PRESETS, argv)  # raises UserError on an unknown key or a bad value


def test_progress_of_a_training_stage(tmp_path):
    ckpt = str(tmp_path / "ckpt.pt")
    assert qs.progress(ckpt) == "missing"
    save_checkpoint({"step": 2, "config": {"max_iters": 4}}, ckpt)
    assert qs.progress(ckpt) == "partial"
    save_checkpoint({"step": 4, "config": {"max_iters": 4}}, ckpt)
    assert qs.progress(ckpt) == "done"


def test_complete_stages_are_skipped_and_a_partial_one_resumes(tmp_path, monkeypatch, capsys):
    cfg = parse_config(qs.Config, qs.PRESETS, ["--preset=tiny", f"--data_dir={tmp_path}/d", f"--out_dir={tmp_path}"])
    for _, _, output in qs.stages(cfg):
        os.makedirs(os.path.dirname(output), exist_ok=True)
        if output.endswith("ckpt.pt"):
            save_checkpoint({"step": 4, "config": {"max_iters": 4}}, output)
        else:
            open(output, "w").write("| table |\n")
    assert qs.main(cfg) == 0.0  # nothing ran
    assert capsys.readouterr().out.count("done already") == len(qs.stages(cfg))
    save_checkpoint({"step": 2, "config": {"max_iters": 4}}, f"{tmp_path}/hear/ckpt.pt")
    ran = []  # record the command instead of training (the resume itself: test_train.py)
    monkeypatch.setattr(qs.subprocess, "run", lambda cmd, **kw: ran.append(cmd) or type("P", (), {"returncode": 0}))
    qs.main(cfg)
    assert len(ran) == 1 and ran[0][1] == "train.py" and ran[0][-1] == "--init_from=resume"
