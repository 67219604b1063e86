"""quickstart.py: every stage command is a valid command of its script, complete stages are skipped, a checkpoint
short of its max_iters resumes (the stages themselves are tested in their own files)."""

import importlib
import json
import os

import pytest
import torch

import quickstart as qs
import train
from checkpoint import load_checkpoint, save_checkpoint
from common import UserError, parse_config


@pytest.mark.parametrize("argv", [["--preset=synthfaces"], ["--preset=synthfaces", "--foundation=scratch"],
                                  ["--preset=foundation"], ["--preset=tiny"]])
def test_every_stage_command_parses_with_its_script_config(argv, tmp_path):
    cfg = parse_config(qs.Config, qs.PRESETS, [*argv, f"--out_dir={tmp_path}"])
    names = [name for name, _, _ in qs.stages(cfg)]
    # the shipped foundation's quick start trains only what HEAR adds; the others train every part
    assert ("judge" in names, "tokenizer" in names) == ((cfg.foundation == "scratch",) * 2)
    assert ("base model" in names) == (cfg.preset in ("foundation", "tiny"))
    if "base model" in names:  # the base reads the text encoder pretrained just before it
        by_name = {name: (command, output) for name, command, output in qs.stages(cfg)}
        text, base = by_name["text encoder"][1], by_name["base model"][0]
        assert names.index("text encoder") + 1 == names.index("base model") and f"--text_init={text}" in base
    hear = next(command for name, command, _ in qs.stages(cfg) if name == "transformer")
    judge = qs.judge_and_tokenizer(cfg)[0]  # the run's own judge gives HEAR its global face tokens
    assert f"--global_face=judge:{judge}" in hear
    if cfg.preset == "foundation":  # the shipped tokenizer: 6000 steps, the decoder alone, then every weight on at
        # falling rates; every later stage reads the last run's codes
        by_name = {name: (command, output) for name, command, output in qs.stages(cfg)}
        chain = ["tokenizer", "tokenizer decoder"] + [f"tokenizer joint {k + 1}" for k in range(len(qs.JOINT_RATES))]
        for before, after in zip(chain, chain[1:]):
            assert f"--init_from={by_name[before][1]}" in by_name[after][0]
        assert "--train_params=decoder" in by_name["tokenizer decoder"][0]
        last = by_name[chain[-1]][1]
        assert last == qs.judge_and_tokenizer(cfg)[1] == os.path.join(cfg.out_dir, qs.SHIPPED["tokenizer.pt"][0])
        assert names.index(chain[-1]) < names.index("face encoder") and f"--tokenizer_ckpt={last}" in hear
    for name, command, _ in qs.stages(cfg) + qs.eval_stages(cfg):
        argv = command[3:] if command[1] == "-m" else command[2:]
        script = command[2] if command[1] == "-m" else command[1].removesuffix(".py")
        module = importlib.import_module(script)
        parse_config(module.Config, module.PRESETS, argv)  # raises UserError on an unknown key or a bad value


def test_hear_iters_sets_the_fine_tune_length_and_is_checked(tmp_path):
    def hear_command(*argv):
        cfg = parse_config(qs.Config, qs.PRESETS, [*argv, f"--out_dir={tmp_path}"])
        return next(command for name, command, _ in qs.stages(cfg) if name == "transformer")
    assert not any(a.startswith("--max_iters") for a in hear_command())  # the preset's 500
    for argv in (["--hear_iters=1000"], ["--preset=foundation", "--hear_iters=1000"]):  # after the preset's: it wins
        assert parse_config(train.Config, train.PRESETS, hear_command(*argv)[2:]).max_iters == 1000
    with pytest.raises(UserError, match="--hear_iters=-1: must be >= 1"):
        qs.main(parse_config(qs.Config, qs.PRESETS, ["--hear_iters=-1", f"--out_dir={tmp_path}"]))


def test_progress_of_a_training_stage(tmp_path):
    ckpt = str(tmp_path / "ckpt.pt")
    assert qs.progress(ckpt) == "missing"
    save_checkpoint({"step": 2, "config": {"max_iters": 4}}, ckpt)
    assert qs.progress(ckpt) == "partial"
    save_checkpoint({"step": 4, "config": {"max_iters": 4}}, ckpt)
    assert qs.progress(ckpt) == "done" and qs.progress(ckpt, 4) == "done"
    with pytest.raises(UserError, match="is a 4-step run, not 10: rerun with --force=True"):
        qs.progress(ckpt, 10)  # another length: resuming would mix two schedules


def test_complete_stages_are_skipped_and_a_partial_one_resumes(tmp_path, monkeypatch, capsys):
    cfg = parse_config(qs.Config, qs.PRESETS, ["--preset=tiny", f"--data_dir={tmp_path}/d", f"--out_dir={tmp_path}"])
    every = qs.stages(cfg) + qs.eval_stages(cfg)
    for _, _, output in every:
        os.makedirs(os.path.dirname(output), exist_ok=True)
        if output.endswith("ckpt.pt"):
            save_checkpoint({"step": 4, "config": {"max_iters": 4}}, output)
        else:
            open(output, "w").write("| table |\n")
    assert qs.main(cfg) == 0.0  # nothing ran
    assert capsys.readouterr().out.count("done already") == len(every)
    save_checkpoint({"step": 2, "config": {"max_iters": 4}}, f"{tmp_path}/hear/ckpt.pt")
    ran = []  # record the command instead of training (the resume itself: test_train.py)
    monkeypatch.setattr(qs.subprocess, "run", lambda cmd, **kw: ran.append(cmd) or type("P", (), {"returncode": 0}))
    qs.main(cfg)
    assert len(ran) == 1 and ran[0][1] == "train.py" and ran[0][-1] == "--init_from=resume"


def fake_foundation_run(cfg):
    """The outputs of a foundation run, without training: tiny checkpoints of the right kinds, and the tables' JSON."""
    model = {"w": torch.arange(4.0)}
    for name, (output, _, _) in qs.SHIPPED.items():
        path = os.path.join(cfg.out_dir, output) if output else os.path.join(cfg.data_dir, "judge.pt")
        ckpt = {"model": model, "optimizer": {"state": {}}, "rng": {"cpu": torch.zeros(2)}, "step": 3,
                "config": {"tokenizer_ckpt": "/abs/tok.pt", "face_encoder_ckpt": "/abs/face.pt", "init_from": "x"}}
        if name in ("base.pt", "hear.pt"):
            ckpt.update(model_config={"use_hf_adapter": name == "hear.pt"}, ema={"w": torch.ones(4)})
        save_checkpoint(ckpt, path)
    for table in ("quickstart/tokenizer_table", "quickstart/generation_table", "quickstart/base_table",
                  "check/tokenizer", "check/base", "check/hear"):
        os.makedirs(os.path.dirname(f"{cfg.out_dir}/{table}"), exist_ok=True)
        open(f"{cfg.out_dir}/{table}.json", "w").write('{"rows": {"x": {"psnr": 1.0}}}')


def test_export_writes_small_files_a_manifest_that_checks_them_and_paths_beside_them(tmp_path):
    cfg = parse_config(qs.Config, qs.PRESETS, ["--preset=foundation", f"--data_dir={tmp_path}/d",
                                               f"--out_dir={tmp_path}/o", f"--weights_dir={tmp_path}/w"])
    fake_foundation_run(cfg)
    qs.export_foundation(cfg)
    qs.write_manifest(cfg, {"data": 1.0})
    manifest = json.load(open(f"{tmp_path}/w/manifest.json"))
    assert sorted(manifest["files"]) == sorted(qs.SHIPPED) and manifest["figures"]["base_table"]["x"]["psnr"] == 1.0
    qs.check_foundation(f"{tmp_path}/w")  # every hash matches
    hear, base = load_checkpoint(f"{tmp_path}/w/hear.pt"), load_checkpoint(f"{tmp_path}/w/base.pt")
    assert "optimizer" not in hear and "rng" not in hear and "ema" not in hear
    half = torch.ones(4, dtype=torch.half)  # the EMA weights are the ones shipped, in fp16
    assert torch.equal(hear["model"]["w"], half) and torch.equal(base["model"]["w"], half)
    assert (hear["config"]["tokenizer_ckpt"], hear["config"]["face_encoder_ckpt"]) == ("tokenizer.pt",
                                                                                        "face_encoder.pt")
    assert (base["config"]["face_encoder_ckpt"], base["config"]["init_from"]) == ("tokenizer.pt", "scratch")
    # hear.pt's global encoder is the shipped judge beside it (pipeline.load_run resolves a bare name there)
    assert (hear["config"]["global_face"], base["config"]["global_face"]) == ("judge:judge.pt", "lowfreq")
    with open(f"{tmp_path}/w/judge.pt", "r+b") as f:  # one byte changed
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(UserError, match=r"judge.pt: its SHA-256 differs from the one .*manifest.json records"):
        qs.check_foundation(f"{tmp_path}/w")
    os.remove(f"{tmp_path}/w/manifest.json")
    with pytest.raises(UserError, match="the shipped foundation is missing"):
        qs.main(parse_config(qs.Config, qs.PRESETS, [f"--weights_dir={tmp_path}/w", f"--out_dir={tmp_path}/q"]))
