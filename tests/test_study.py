"""study.py and its eval.py modes: the ablation switches build exactly the expected parameters, the per-scale scorer
follows the running sum, the seed table's statistics, every command parses with its script's Config, finished work is
skipped, and per_scale / strength end to end on a tiny trained run (no test trains a real ablation)."""

import importlib
import json
import os
import sys
import threading

import pytest
import torch

import eval as ev
import study
import tokenizer as tok
from checkpoint import save_checkpoint
from common import parse_config
from conftest import write_tokenizer_ckpt
from data.synthfaces.judge import Judge
from metrics import judge_scores, per_scale_scores

ATTRS = {"background": ["red", "blue"], "clothing": ["red"], "accessory": ["none"], "accessory_color": ["none"],
         "expression": ["neutral"], "position": ["center"], "size": ["small"], "lighting": ["even"], "style": ["photo"]}
JUDGE = dict(resolution=16, id_size=16, crop_scale=1.4, embed_dim=8, n_ids=3, attributes=ATTRS)


def tiny_study(tmp_path, *flags):
    return parse_config(study.Config, study.PRESETS, ["--preset=tiny", f"--out_dir={tmp_path}/study", *flags])


@pytest.mark.parametrize("preset", ["synthfaces", "tiny"])
def test_every_study_command_parses_with_its_script_config(preset, tmp_path):
    steps = study.commands(tiny_study(tmp_path, f"--preset={preset}"))
    for step in steps:
        module = importlib.import_module(step.argv[1].removesuffix(".py"))
        parse_config(module.Config, module.PRESETS, step.argv[2:])  # UserError on an unknown key or a bad value
    seeds = study.PRESETS[preset].get("seeds", 3)
    trains = [s for s in steps if s.argv[1] == "train.py"]
    assert len(trains) == 4 * seeds + seeds  # the table3 variants, then HEAR on the tokenizer's own face tokens
    assert len({s.output for s in steps}) == len(steps)  # the runs that several parts share run once
    assert sum(s.argv[1] == "train_tokenizer.py" for s in steps) == 4  # plain, w/o VQ, w/o identity, w/o face mask


@pytest.mark.parametrize("preset", ["synthfaces", "tiny"])
def test_trained_runs_follow_the_quick_starts_commands(preset):
    """Apart from the ablation switches, the seed and the output folder, study.py trains and scores each run with the
    quick start's command for that stage: the study uses whatever recipe the quick start uses."""
    import quickstart

    qs_cfg = parse_config(quickstart.Config, quickstart.PRESETS, [f"--preset={preset}"])
    qs = {name: argv for name, argv, _ in quickstart.stages(qs_cfg) + quickstart.eval_stages(qs_cfg)}
    steps = {s.name: s.argv for s in study.commands(parse_config(study.Config, study.PRESETS, [f"--preset={preset}"]))}

    def flags(argv, *drop):  # the script and its flags, without the keys in drop
        return {a for a in argv[1:] if a.split("=")[0].removeprefix("--") not in drop}

    switches = ("out_dir", "seed", "use_global_face", "use_hf_adapter")
    assert flags(steps["train full_s0"], *switches) == flags(qs["transformer"], "out_dir")
    assert "--use_global_face=True" in steps["train full_s0"] and "--use_hf_adapter=True" in steps["train full_s0"]
    assert flags(steps["tokenizer tok_no_vq"], "out_dir", "vq_weight") == flags(qs["face encoder"], "out_dir")
    assert flags(steps["eval full_s0"], "out", "ckpt") == flags(qs["generation table"], "out", "ckpt", "gallery_ids")


def test_each_variant_builds_exactly_its_identity_parameters(tmp_path):
    """train.py with a variant's flags -> a transformer whose parameters differ from the text-only backbone by exactly
    the global projection and/or the high-frequency adapter (W_hf and every block's W'_K, W'_V and V bias)."""
    import train
    from pipeline import build_hear

    steps = study.commands(tiny_study(tmp_path, "--parts=table3", "--seeds=1"))
    names = {}
    for step in (s for s in steps if s.argv[1] == "train.py"):
        cfg = parse_config(train.Config, train.PRESETS, [*step.argv[2:], "--init_from=scratch"])  # new weights
        hear, _ = build_hear(cfg, text_channels=128, d=8, face_dim=8, global_dim=8)
        names[os.path.basename(cfg.out_dir).removesuffix("_s0")] = {n for n, _ in hear.named_parameters()}
    glob = {"face_global_proj.weight", "face_global_proj.bias"}
    hf = {"face_hf_proj.weight", "face_hf_proj.bias"} | {f"blocks.{i}.ca.{p}" for i in range(cfg.depth)
                                                         for p in ("mat_kv_hf.weight", "v_bias_hf")}
    backbone = names["text_only"]
    assert not backbone & (glob | hf) and len(backbone) > 20
    assert names["full"] == backbone | glob | hf
    assert names["no_hf"] == backbone | glob
    assert names["no_global"] == backbone | hf


def test_per_scale_face_sim_follows_the_running_sum(tiny_manifest, tmp_path, one_thread):
    """Running sums of a real image's multi-scale codes: the last row is the FaceSim judge_scores gives the decoded
    image; with the last scales' contributions zeroed the rows stop changing exactly where the sum does."""
    from data.manifest import load_image

    vae = tok.BSQVAE(tok.TokenizerConfig(base_ch=32, ch_mult=(1, 1), num_res_blocks=1, codebook_dim=8, patch_size=2))
    judge = Judge(**JUDGE).eval()
    x = torch.stack([load_image(f"{tiny_manifest}/{i}.png", (16, 16)) for i in range(3)])  # (3, 3, 16, 16)
    with torch.no_grad():
        q = vae.quantize(vae.encode(x), tok.small_schedule(8, 8))
        ref_embs, own = judge.embed(x.flip(0), "eval"), torch.tensor([2, 1, 0])  # reference of image b: x[b] itself
        sums, z = [], 0
        for codes in q["codes"]:  # the sums of multiscale_bsq, in its order: the last one is q["z"] bit for bit
            z = z + tok.resample(codes, (8, 8), "trilinear")
            sums.append(z)
        assert len(sums) == 5 and torch.equal(sums[-1], q["z"])
        full = per_scale_scores(judge, vae.decode, sums, ref_embs, own)["face_sim"]  # (K, B)
        final = judge_scores(judge, vae.decode(q["z"]), ref_embs, own, [{"background": "red"}] * 3)["face_sim"]
        zeroed = per_scale_scores(judge, vae.decode, sums[:2] + [sums[1]] * 3, ref_embs, own)["face_sim"]
    assert full.shape == (5, 3) and full.abs().max() <= 1 + 1e-6
    assert torch.equal(full[-1], final)  # the same decode, detection, crop and embedding on the same latent
    assert torch.equal(zeroed[:2], full[:2]) and all(torch.equal(zeroed[k], zeroed[1]) for k in (2, 3, 4))
    assert not torch.equal(full[1], full[-1])  # the scales after the second do change the face


def test_seed_table_and_paired_differences_of_fake_runs(tmp_path):
    cfg = tiny_study(tmp_path, "--seeds=2")
    runs = {("full", 0): 0.1, ("full", 1): 0.3, ("no_hf", 0): 0.05, ("no_hf", 1): 0.15, ("text_only", 0): 0.05}
    for (variant, seed), v in runs.items():
        os.makedirs(study.run_dir(cfg, variant, seed))
        row = {"face_sim": v, "top1": 2 * v, "coarse_trait": 0.5 + v, "fine_trait": v / 2, "prompt_acc": 0.5}
        own = "base model (prompt only)" if variant == "text_only" else "HEAR (face + prompt)"  # eval.py's first row
        with open(f"{study.run_dir(cfg, variant, seed)}/generation.json", "w") as f:
            json.dump({"rows": {own: row, "null face (prompt only)": {}}}, f)
    record = {"commit": "abc", "machine": {}, "study_command": "python study.py", "commands": {}}
    study.write_tables(cfg, record, "table3", [(v[0], k, "face_encoder") for k, v in reversed(study.VARIANTS.items())])
    rows = open(f"{cfg.out_dir}/table3.md").read().splitlines()
    assert rows[0] == "| model | FaceSim | identity top-1 | coarse traits | fine traits | prompt adherence | seeds |"
    assert rows[2] == ("| HEAR (both identity paths) | 0.2000 ± 0.1414 | 0.4000 ± 0.2828 | 0.7000 ± 0.1414 | "
                       "0.1000 ± 0.0707 | 0.5000 ± 0.0000 | 2 |")
    assert rows[4] == "| text only (no face) | 0.0500 | 0.1000 | 0.5500 | 0.0250 | 0.5000 | 1 |"  # one seed: no spread
    numbers = json.load(open(f"{cfg.out_dir}/table3.json"))
    full = numbers["rows"]["HEAR (both identity paths)"]["face_sim"]
    assert full["mean"] == pytest.approx(0.2) and full["std"] == pytest.approx(2**0.5 / 10)  # sample std
    # full minus w/o adapter, seed by seed: 0.05 and 0.15 -> mean 0.1, sample std 0.0707, standard error 0.05
    no_hf = "w/o high-frequency adapter (global face tokens only)"
    diff = numbers["differences"]["rows"][no_hf]
    assert diff["face_sim"]["mean"] == pytest.approx(0.1) and diff["face_sim"]["se"] == pytest.approx(0.05)
    assert diff["fine_trait"]["mean"] == pytest.approx(0.05) and diff["fine_trait"]["se"] == pytest.approx(0.025)
    assert list(numbers["differences"]["rows"]) == [no_hf]  # the one-seed row has no pairs at 2 seeds
    assert f"| {no_hf} | +0.1000 ± 0.0500 | +0.2000 ± 0.1000 | +0.1000 ± 0.0500 | +0.0500 ± 0.0250 |" in \
        "\n".join(rows)


def fake_output(path):
    """A finished output of each kind study.py checks."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    curve = {"values": [0, 1], "face_sim": [0.1, 0.2], "prompt_acc": [0.5, 0.4]}
    numbers = {"rows": {"HEAR (face + prompt)": {"face_sim": 0.1, "top1": 0.1, "prompt_acc": 0.5}},
               "face_sim": [0.0, 0.1, 0.2], "id_scale": curve, "hf_from_scale": curve}
    if path.endswith("ckpt.pt"):
        return save_checkpoint({"step": 4, "config": {"max_iters": 4}}, path)
    with open(path, "w") as f:
        f.write(json.dumps(numbers))
    with open(path.removesuffix(".json") + ".md", "w") as f:  # the table beside its numbers
        f.write("| table |\n")


def test_finished_outputs_are_skipped_and_a_partial_run_resumes(tmp_path, monkeypatch):
    d = f"{tmp_path}/d"
    cfg = tiny_study(tmp_path, f"--data_dir={d}", f"--tokenizer_ckpt={d}/tok.pt", f"--face_encoder_ckpt={d}/face.pt",
                     f"--judge={d}/judge.pt", f"--base_ckpt={d}/base.pt")
    for path in [cfg.judge, cfg.base_ckpt, f"{d}/tok.pt", f"{d}/face.pt"] + [s.output for s in study.commands(cfg)]:
        fake_output(path)
    ran = []  # the commands that would run (each command itself: its script's tests)
    monkeypatch.setattr(study, "spawn", lambda argv, log_file, threads: ran.append(argv) or (0, 0.0))
    record = study.main(cfg)
    assert ran == [] and record["total_cpu_s"] == 0 and record["machine"]["cores"] >= 1
    assert all(os.path.isfile(f"{cfg.out_dir}/{n}") for n in ("table3.md", "table4.md", "per_scale.png",
                                                              "strength.png", "study.json"))
    save_checkpoint({"step": 2, "config": {"max_iters": 4}}, f"{study.run_dir(cfg, 'no_hf', 1)}/ckpt.pt")
    record = study.main(cfg)
    assert len(ran) == 1 and ran[0][1] == "train.py" and ran[0][-1] == "--init_from=resume"
    assert list(record["commands"]) == [f"{study.run_dir(cfg, 'no_hf', 1)}/ckpt.pt"]
    assert json.load(open(f"{cfg.out_dir}/study.json"))["total_cpu_s"] == record["total_cpu_s"] >= 0


def test_jobs_run_trainings_side_by_side_then_the_evaluations(tmp_path, monkeypatch):
    """--jobs=2: two trainings are in flight at once (a 2-party barrier only opens then), each with half the cores;
    evaluations start after the last training, with the inherited thread count; a failed training stops the study."""
    d = f"{tmp_path}/d"
    cfg = tiny_study(tmp_path, "--jobs=2", "--parts=table3", f"--data_dir={d}", f"--tokenizer_ckpt={d}/tok.pt",
                     f"--face_encoder_ckpt={d}/face.pt", f"--judge={d}/judge.pt", f"--base_ckpt={d}/base.pt")
    for path in [cfg.judge, cfg.base_ckpt, f"{d}/tok.pt", f"{d}/face.pt"]:
        fake_output(path)
    steps, barrier, ran = study.commands(cfg), threading.Barrier(2, timeout=20), []

    def spawn(argv, log_file, threads):
        step = next(s for s in steps if s.argv == argv)
        if step.output.endswith("ckpt.pt"):
            barrier.wait()  # raises BrokenBarrierError unless another training runs at the same time
        ran.append((step, threads))
        fake_output(step.output)
        return 0, 1.5

    monkeypatch.setattr(study, "spawn", spawn)
    record = study.main(cfg)
    trained = [s.output.endswith("ckpt.pt") for s, _ in ran]
    assert len(ran) == len(steps) and trained == sorted(trained, reverse=True) and sum(trained) == 2 * 4
    assert {t for s, t in ran} == {max(1, os.cpu_count() // 2), 0} and record["total_cpu_s"] == 1.5 * len(steps)
    assert {t for s, t in ran if not s.output.endswith("ckpt.pt")} == {0}
    os.remove(steps[0].output)
    monkeypatch.setattr(study, "spawn", lambda argv, log_file, threads: (1, 0.0))
    with pytest.raises(study.UserError, match="failed .exit 1.; its log"):
        study.main(cfg)


def test_spawn_reports_the_exit_code_the_thread_setting_and_the_childs_cpu(tmp_path):
    code = "import os, sys, time; t = time.process_time(); print(os.environ['OMP_NUM_THREADS'])\n" \
           "while time.process_time() - t < 0.2: pass\nsys.exit(3)"
    with open(tmp_path / "log", "w") as f:
        assert study.spawn([sys.executable, "-c", code], f, 1)[0] == 3
    with open(tmp_path / "log", "w") as f:
        exit_code, cpu = study.spawn([sys.executable, "-c", code], f, 5)
    assert exit_code == 3 and cpu >= 0.2 and open(tmp_path / "log").read() == "5\n"


def test_per_scale_and_strength_on_a_tiny_run(tiny_run, tmp_path, one_thread):
    """End to end on a tiny trained run and a random judge. Every setting restarts the generator, so settings that
    sample the same thing agree exactly: the adapter from scale 0 = id_scale 1, from scale K = id_scale 0, and the
    per-scale curve ends at the final image's FaceSim."""
    import train

    data, tok_ckpt, face_ckpt = tiny_run
    records = [json.loads(line) for line in open(f"{data}/manifest.jsonl")]
    with open(f"{data}/manifest.jsonl", "w") as f:
        for r in records:
            r["attributes"] = {k: v[0] for k, v in ATTRS.items()}
            f.write(json.dumps({**r, "crop_path": r["path"]}) + "\n")
    out = str(tmp_path / "run")
    train.main(parse_config(train.Config, train.PRESETS, [
        "--preset=tiny", f"--data_dir={data}", f"--tokenizer_ckpt={tok_ckpt}", f"--face_encoder_ckpt={face_ckpt}",
        f"--out_dir={out}", "--device=cpu", "--max_iters=2"]))
    save_checkpoint({"model": Judge(**JUDGE).state_dict(), "judge_config": JUDGE}, f"{tmp_path}/judge.pt")
    flags = [f"--ckpt={out}/ckpt.pt", f"--data_dir={data}", f"--judge={tmp_path}/judge.pt", "--device=cpu",
             "--prompts_per_identity=2"]
    ev.main(parse_config(ev.Config, ev.PRESETS, ["--what=per_scale", f"--out={tmp_path}/ps.md", *flags]))
    ev.main(parse_config(ev.Config, ev.PRESETS, ["--what=strength", f"--out={tmp_path}/st.md", "--id_scales=(0.0,1.0)",
                                                 *flags]))
    per_scale, strength = (json.load(open(f"{tmp_path}/{n}.json")) for n in ("ps", "st"))
    K = strength["num_scales"]
    assert per_scale["k"] == list(range(1, K + 1)) and all(-1 <= v <= 1 for v in per_scale["face_sim"])
    by_id, by_k = strength["id_scale"], strength["hf_from_scale"]
    assert by_k["values"] == list(range(K + 1)) and by_id["values"] == [0.0, 1.0]
    for key in ("face_sim", "top1", "prompt_acc"):
        assert by_k[key][0] == by_id[key][1] and by_k[key][K] == by_id[key][0]
    assert per_scale["face_sim"][-1] == pytest.approx(by_id["face_sim"][1], abs=1e-6)  # a mean of the same values
    assert "| hf_from_scale | FaceSim |" in open(f"{tmp_path}/st.md").read()


def test_a_tokenizer_checkpoint_in_the_table_writes_its_numbers(tiny_manifest, tmp_path, one_thread):
    path = write_tokenizer_ckpt(str(tmp_path / "a.pt"))
    ev.main(parse_config(ev.Config, ev.PRESETS, ["--what=tokenizer", f"--ckpts={path}", "--names=a", "--judge=",
                                                 f"--data_dir={tiny_manifest}", "--image_size=16", "--device=cpu",
                                                 f"--out={tmp_path}/t.md"]))
    numbers = json.load(open(f"{tmp_path}/t.json"))["rows"]["a"]
    assert f"| a | {numbers['mse']:.2f} | {numbers['ssim']:.4f} |" in open(f"{tmp_path}/t.md").read()
