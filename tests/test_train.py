"""train.py: manifest format errors, a tiny run end to end, resume == uninterrupted, 2-process DDP == 1 process."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import train
from common import UserError, parse_config
from checkpoint import load_checkpoint
from common import setup_device
from conftest import max_diff, parity_bar
from data.manifest import epoch_batches, load_image, pick_references, read_manifest
from face_encoder import face_schedule, hf_split
from tokenizer import token_offsets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def args(tiny_run, out, *extra):
    data, tok_ckpt, face_ckpt = tiny_run
    return ["--preset=tiny", f"--data_dir={data}", f"--tokenizer_ckpt={tok_ckpt}", f"--face_encoder_ckpt={face_ckpt}",
            f"--out_dir={out}", "--device=cpu", *extra]


def run(argv):
    return train.main(parse_config(train.Config, train.PRESETS, argv))


def test_tiny_run_logs_and_checkpoint(tiny_run, tmp_path):
    out = str(tmp_path / "run")
    history = run(args(tiny_run, out))
    assert len(history) == 4 and all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    text = open(os.path.join(out, "log.txt")).read()
    assert "bit acc coarse/mid/fine" in text and "tok/s" in text and "MFU n/a" in text
    ckpt = load_checkpoint(os.path.join(out, "ckpt.pt"))
    assert ckpt["step"] == 4 and ckpt["model_config"]["use_hf_adapter"] and ckpt["model_config"]["codebook_dim"] == 8
    # everything sample.py needs comes back from the checkpoint alone
    from pipeline import load_run

    loaded = load_run(os.path.join(out, "ckpt.pt"))
    assert loaded.step == 4 and loaded.caption_tokenizer("a red face")["input_ids"][-1] == 1  # </s> appended


def test_resume_equals_uninterrupted(tiny_run, tmp_path):
    """With stochastic depth, so that the losses also depend on the global RNG stream (reseeded each step), and HEAR's
    new parameters at their own lr: a resumed run keeps its multiple, whatever the restart's command line says."""
    a, b, extra = str(tmp_path / "a"), str(tmp_path / "b"), ("--drop_path_rate=0.5", "--hear_lr_mult=3")
    full = run(args(tiny_run, a, "--max_iters=4", *extra))
    run(args(tiny_run, b, "--max_iters=2", *extra))
    resumed = run(args(tiny_run, b, "--max_iters=4", "--drop_path_rate=0.5", "--hear_lr_mult=1", "--init_from=resume"))
    assert [h["loss"] for h in resumed] == [h["loss"] for h in full[2:]]  # same next losses, exactly
    wa, wb = load_checkpoint(f"{a}/ckpt.pt")["model"], load_checkpoint(f"{b}/ckpt.pt")["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def assert_same_gradient(name, ckpt_a, ckpt_b):
    """The first step's AdamW state, exp_avg = (1 - beta1) * gradient, agrees tensor by tensor within the bar of two
    summation orders (conftest): `depth` = forward and backward through every trained matrix, fan_in = the weight
    gradients' sums over the batch's tokens (at most batch * pixels). The weights after the step are no fair check:
    Adam divides by sqrt(v) + eps, so a rounding-level difference in a near-zero gradient moves a weight by up to lr."""
    a, b = load_checkpoint(ckpt_a), load_checkpoint(ckpt_b)
    assert a["step"] == b["step"] == 1
    state_a, state_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert state_a.keys() == state_b.keys()
    depth = 2 * sum(s["exp_avg"].dim() >= 2 for s in state_a.values())
    fan_in = a["config"]["batch_size"] * a["config"]["image_size"] ** 2
    bars = {i: parity_bar(s["exp_avg"], depth, fan_in) for i, s in state_a.items()}
    diffs = {i: (state_b[i]["exp_avg"] - s["exp_avg"]).abs().max().item() for i, s in state_a.items()}
    ratios = {i: 0.0 if diffs[i] == 0 else diffs[i] / bars[i] if bars[i] > 0 else math.inf for i in diffs}
    worst = max(ratios, key=ratios.get)  # reported (pytest -s) as the one tensor nearest its bar
    max_diff(f"{name}: exp_avg[{worst}] of {len(bars)}", state_b[worst]["exp_avg"], state_a[worst]["exp_avg"],
             bars[worst])
    assert max(ratios.values()) <= 1, ratios


def test_ddp_two_processes_equals_one(tiny_run, tmp_path):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    extra = ["--max_iters=1", "--bsc_p_max=0.0", "--cond_drop_prob=0.0"]
    run(args(tiny_run, one, *extra))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "train.py"), *args(tiny_run, two, *extra)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert_same_gradient("DDP", f"{one}/ckpt.pt", f"{two}/ckpt.pt")


def test_ddp_ranks_keep_their_own_random_streams_across_a_resume(tiny_run, tmp_path):
    """2 gloo processes with stochastic depth; rank 1 is SIGKILLed as step 3 ends (after the step-2 checkpoint) and
    torchrun --max-restarts=1 resumes both from it. Each drop-path draw records a digest of the RNG state it draws from
    (tests/drop_path_probe.py): the two ranks' streams differ at every step, before the resume and after it, and each
    rank's resumed step 3 draws from the stream its interrupted step 3 drew from."""
    out, probe = str(tmp_path / "r"), tmp_path / "probe"
    probe.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=1",
           os.path.join(ROOT, "tests", "drop_path_probe.py"),
           *args(tiny_run, out, "--max_iters=4", "--drop_path_rate=0.5", "--dist_timeout_s=60")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HEAR_TEST_KILL": "1:3", "HEAR_PROBE": str(probe), "PYTHONPATH": ROOT}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from step 2" in open(f"{out}/log.txt").read()
    draws = {}  # (attempt, rank, step) -> digests of that step's draws (2 per step: block 1's SA and FFN branches)
    for rank in (0, 1):
        for attempt, r, step, digest in map(json.loads, open(probe / f"rank{rank}.jsonl")):
            draws.setdefault((attempt, r, step), []).append(digest)
    assert sorted({(a, s) for a, _, s in draws}) == [(0, 1), (0, 2), (0, 3), (1, 3), (1, 4)]
    assert all(draws[a, 0, s] != draws[a, 1, s] for a, _, s in draws)  # each rank its own stream, resumed or not
    assert all(draws[1, r, 3] == draws[0, r, 3] for r in (0, 1))  # resumed step 3 = interrupted step 3, per rank


def test_manifest_errors_are_one_line(tmp_path):
    (tmp_path / "manifest.jsonl").write_text(json.dumps({"path": "a.png"}) + "\n")
    with pytest.raises(UserError, match=r"manifest.jsonl:1: missing field\(s\) \['face_box'"):
        read_manifest(str(tmp_path))
    (tmp_path / "manifest.jsonl").write_text("{not json\n")
    with pytest.raises(UserError, match="not valid JSON"):
        read_manifest(str(tmp_path))
    (tmp_path / "bad.png").write_bytes(b"nope")
    with pytest.raises(UserError, match="is not an image file"):
        load_image(str(tmp_path / "bad.png"))


def test_epoch_batches_cover_each_bucket_once():
    buckets = [list(range(0, 10)), list(range(10, 16))]
    batches = epoch_batches(16, 3, epoch=0, seed=1, buckets=buckets)
    assert all(len(b) == 3 and len({i >= 10 for i in b}) == 1 for b in batches)  # never mixes aspect buckets
    assert len(set(sum(batches, []))) == 15  # 3 + 2 full batches, each index at most once
    assert batches == epoch_batches(16, 3, epoch=0, seed=1, buckets=buckets)
    assert batches != epoch_batches(16, 3, epoch=1, seed=1, buckets=buckets)


def test_grad_accumulation_equals_one_big_batch(tiny_run, tmp_path):
    extra = ["--max_iters=1", "--bsc_p_max=0.0", "--cond_drop_prob=0.0"]
    run(args(tiny_run, str(tmp_path / "big"), *extra))
    run(args(tiny_run, str(tmp_path / "acc"), *extra, "--grad_accum=2"))
    assert_same_gradient("grad accumulation", f"{tmp_path}/big/ckpt.pt", f"{tmp_path}/acc/ckpt.pt")


def test_step_without_cache_encodes_each_image_once_in_fp32(tiny_run, tmp_path):
    """cache_features=False (the infinity_2b setting): one step encodes every target once with the tokenizer and every
    distinct reference once with the face encoder (never a reference's full image), with autocast off."""
    cfg = parse_config(train.Config, train.PRESETS, args(tiny_run, str(tmp_path / "r"), "--cache_features=False"))
    run = train.build_state(cfg, setup_device("cpu"))
    seen = {"vae": [], "face": []}
    for name, net in (("vae", run.vae), ("face", run.face_enc)):
        def encode(x, _orig=net.encode, _name=name):
            seen[_name].append((len(x), x.dtype, torch.is_autocast_enabled("cpu")))
            return _orig(x)
        net.encode = encode
    batch = epoch_batches(len(run.records), cfg.batch_size, 0, cfg.seed)[0]
    refs = pick_references(run.records, run.pools, batch, seeded_generator_u(cfg, 0), cfg.self_ref_prob)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # even under an enclosing autocast the encoders run in fp32
        out = train.train_step(run, cfg, batch, 1.0)
    assert sum(n for n, _, _ in seen["vae"]) == len(batch)
    # the cross-attention keys MFU counts (model.estimate_flops_per_token): caption, global and high-frequency face
    face = face_schedule(cfg.face_size, run.face_enc.cfg.patch_size, cfg.hf_first_scale)
    n_global = hf_split(face, cfg.hf_first_scale)
    assert out[3][0] > 0 and out[3][1:] == (n_global, token_offsets(face)[-1] - n_global)
    assert sum(n for n, _, _ in seen["face"]) == len(set(refs))
    assert all(dtype == torch.float32 and not autocast for _, dtype, autocast in seen["vae"] + seen["face"])


def seeded_generator_u(cfg, step):
    """The reference draws train_step makes at `step` (the third of its per-sample uniform draws)."""
    from common import seeded_generator

    g = seeded_generator(cfg.seed, step)
    return [torch.rand(cfg.batch_size, generator=g) for _ in range(3)][2]


def test_hf_first_scale_without_high_frequency_tokens_is_a_config_error(tiny_run, tmp_path):
    from face_encoder import FaceError

    with pytest.raises(FaceError, match="hf_first_scale=5 leaves no high-frequency face tokens"):
        run(args(tiny_run, str(tmp_path / "r"), "--hf_first_scale=5"))  # 16 px crop, patch 2: 5 scales


def test_self_ref_prob_mixes_own_face_and_another_image_of_the_person():
    """pick_references: u < self_prob gives the target itself; above it, u is rescaled to an index into the pool, so
    self_prob=0 is the plain pool draw and every pool member stays reachable for any self_prob < 1."""
    records = [{"identity": "a"}] * 4 + [{"identity": "b"}] * 2
    pools = {"a": [0, 1, 2, 3], "b": [4, 5]}
    u = torch.tensor([0.1, 0.1, 0.3, 0.99, 0.6, 0.0])
    assert pick_references(records, pools, [3, 4, 0, 1, 5, 2], u) == [0, 4, 1, 3, 5, 0]
    assert pick_references(records, pools, [3, 4, 0, 1, 5, 2], u, self_prob=1.0) == [3, 4, 0, 1, 5, 2]
    # self_prob 0.2: u 0.1 -> self; u 0.3 -> (0.1/0.8) of the pool -> index 0; u 0.99 -> last; u 0.6 -> 0.5 -> b[1]
    assert pick_references(records, pools, [3, 4, 0, 1, 5, 2], u, self_prob=0.2) == [3, 4, 0, 3, 5, 2]


def test_reference_crop_is_cut_from_the_references_own_image(tmp_path):
    """A reference without crop_path is cut from its own image at its own size (face_box is in its pixels), not from
    the image resized to the target's bucket: a red face square in a 32 x 64 white image gives an all-red crop."""
    from PIL import Image

    from data.manifest import load_face_crop

    img = np.full((64, 32, 3), 255, np.uint8)  # (H, W, 3), portrait
    img[40:56, 8:24] = (255, 0, 0)  # face box x0, y0, x1, y1 = 8, 40, 24, 56
    Image.fromarray(img).save(tmp_path / "p.png")
    crop = load_face_crop({"path": str(tmp_path / "p.png"), "face_box": [8, 40, 24, 56]}, 16, crop_scale=1.0)
    assert crop.shape == (3, 16, 16)
    assert crop[0].min() > 0.9 and crop[1:].max() < -0.9  # red everywhere: box and crop coincide


def test_fine_tune_from_a_base_loads_its_transformer_and_text_encoder(tiny_run, tmp_path):
    """init_from=<a text-only base's ckpt.pt>: every base tensor arrives unchanged, HEAR's paths are new (W'_K, W'_V
    copies of the loaded W_K, W_V, Eq. 6); a file that is not a train.py checkpoint is one line."""
    base, hear = str(tmp_path / "base"), str(tmp_path / "hear")
    run(args(tiny_run, base, "--use_global_face=False", "--use_hf_adapter=False", "--max_iters=2"))
    history = run(args(tiny_run, hear, f"--init_from={base}/ckpt.pt", "--max_iters=1", "--learning_rate=0"))
    b, h = load_checkpoint(f"{base}/ckpt.pt"), load_checkpoint(f"{hear}/ckpt.pt")
    new = {k for k in h["model"] if k not in b["model"]}
    assert new and all(k.startswith("face_") or "_hf" in k for k in new)
    assert all(torch.equal(h["model"][k], v) for k, v in b["model"].items())  # lr 0: nothing moved
    assert all(torch.equal(h["text_encoder"][k], v) for k, v in b["text_encoder"].items())
    assert all(torch.equal(h["model"][k.replace("mat_kv", "mat_kv_hf")], v) for k, v in b["model"].items()
               if k.startswith("blocks.") and k.endswith("ca.mat_kv.weight"))
    assert h["caption_tokenizer"] == b["caption_tokenizer"] and math.isfinite(history[0]["loss"])
    with pytest.raises(UserError, match="not a train.py checkpoint"):
        run(args(tiny_run, str(tmp_path / "bad"), f"--init_from={tiny_run[1]}"))
