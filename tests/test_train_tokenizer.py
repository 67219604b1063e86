"""train_tokenizer.py: a tiny run end to end, resume == uninterrupted, the face-loss mode, bad input."""

import os
import subprocess
import sys

import pytest
import torch

import face_loss as fl
import train_tokenizer as tt
from common import UserError, parse_config
from checkpoint import load_checkpoint


def run(argv):
    cfg = parse_config(tt.Config, tt.PRESETS, argv)
    tt.main(cfg)
    return cfg


def test_tiny_run_writes_config_log_ckpt_and_metrics(tiny_manifest, tmp_path):
    out = str(tmp_path / "tok")
    run(["--preset=tiny", f"--data_dir={tiny_manifest}", f"--out_dir={out}", "--device=cpu"])
    assert {"config.json", "log.txt", "ckpt.pt", "recon.png"} <= set(os.listdir(out))
    ckpt = load_checkpoint(os.path.join(out, "ckpt.pt"))  # weights_only=True
    assert ckpt["step"] == 4 and {"mse", "psnr", "ssim", "face_psnr"} <= set(ckpt["metrics"])
    assert "active loss terms ['l1', 'l2', 'vq']" in open(os.path.join(out, "log.txt")).read()


def test_resume_equals_uninterrupted(tiny_manifest, tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    common = ["--preset=tiny", f"--data_dir={tiny_manifest}", "--device=cpu", "--max_iters=4", "--eval_interval=100"]
    run(common + [f"--out_dir={a}"])
    run(common + [f"--out_dir={b}", "--max_iters=2"])  # stops at 2 (final eval + checkpoint)
    run(common + [f"--out_dir={b}", "--init_from=resume"])
    wa, wb = load_checkpoint(os.path.join(a, "ckpt.pt"))["model"], load_checkpoint(os.path.join(b, "ckpt.pt"))["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_loss_goes_down_on_tiny_data(tiny_manifest, tmp_path):
    out = str(tmp_path / "o")
    run(["--preset=tiny", f"--data_dir={tiny_manifest}", f"--out_dir={out}", "--device=cpu", "--max_iters=60",
         "--eval_interval=1000", "--log_interval=10", "--learning_rate=3e-3", "--warmup_iters=5"])
    losses = [float(line.split("loss ")[1].split(" ")[0]) for line in open(os.path.join(out, "log.txt"))
              if "| loss " in line]
    assert losses[-1] < 0.6 * losses[0]


def test_face_mode_uses_mask_and_identity_network(tiny_manifest, tmp_path):
    torch.save(fl.IResNet(layers=(1, 1, 1, 1), width=8, emb_dim=16, input_size=16).state_dict(), tmp_path / "id.pth")
    base = str(tmp_path / "base")
    run(["--preset=tiny", f"--data_dir={tiny_manifest}", f"--out_dir={base}", "--device=cpu"])
    face = str(tmp_path / "face")
    run(["--preset=tiny", f"--data_dir={tiny_manifest}", f"--out_dir={face}", "--device=cpu", "--face_mask=True",
         f"--init_from={base}/ckpt.pt", "--id_weight=0.1", f"--id_net={tmp_path}/id.pth"])
    text = open(os.path.join(face, "log.txt")).read()
    assert "active loss terms ['l1', 'l2', 'vq', 'id'] (alpha 2.0)" in text and "id " in text
    # the generation tokenizer's checkpoint is untouched by the face fine-tune
    assert load_checkpoint(os.path.join(base, "ckpt.pt"))["step"] == 4


def test_decoder_fine_tune_keeps_every_code(tiny_manifest, tmp_path):
    """--train_params=decoder sharpens the decoder while every image keeps its codes, so the transformers trained on
    them stay valid: the codes of held-out images are bit-identical before and after, the reconstructions are not."""
    from data.manifest import load_example, read_manifest
    from pipeline import load_tokenizer

    base, dec = str(tmp_path / "base"), str(tmp_path / "dec")
    run(["--preset=tiny", f"--data_dir={tiny_manifest}", f"--out_dir={base}", "--device=cpu"])
    run(["--preset=tiny", f"--data_dir={tiny_manifest}", f"--out_dir={dec}", "--device=cpu", "--max_iters=6",
         f"--init_from={base}/ckpt.pt", "--train_params=decoder", "--learning_rate=3e-3"])
    x = torch.stack([load_example(r, (16, 16))[0] for r in read_manifest(tiny_manifest, "test")])
    bits, recon = [], []
    with torch.no_grad():
        for folder in (base, dec):
            vae = load_tokenizer(os.path.join(folder, "ckpt.pt"))[0]
            q = vae.quantize(vae.encode(x))
            bits.append(q["bits"]), recon.append(vae.decode(q["z"]))
    assert all(torch.equal(a, b) for a, b in zip(*bits))
    assert (recon[0] - recon[1]).abs().max() > 0.1  # 6 AdamW steps at lr 3e-3: measured 1.1 on images in [-1, 1]


def test_bad_inputs_are_one_line_errors(tmp_path, tiny_manifest):
    with pytest.raises(UserError, match="manifest .* not found"):
        run(["--preset=tiny", f"--data_dir={tmp_path}/nowhere", f"--out_dir={tmp_path}/x", "--device=cpu"])
    with pytest.raises(UserError, match="dino_path"):
        run(["--preset=tiny", f"--data_dir={tiny_manifest}", f"--out_dir={tmp_path}/y", "--device=cpu",
             "--dino_weight=0.1"])
    with pytest.raises(UserError, match="train_params='encoder'"):
        run(["--preset=tiny", f"--data_dir={tiny_manifest}", f"--out_dir={tmp_path}/z", "--device=cpu",
             "--train_params=encoder"])


def test_ddp_two_processes_equals_one(tiny_manifest, tmp_path):
    """torchrun with 2 gloo processes, each on half of the global batch, ends at the function of one process on the
    whole batch: one initialisation, gradients averaged by a SUM all-reduce (gloo has no AVG), rank 0 writes. The
    codebook-entropy regulariser is a statistic of the images one rank sees, so it is off here. Compared on what the
    networks compute: a conv bias in front of a one-channel-per-group GroupNorm has a mathematically zero gradient,
    which AdamW's first steps turn into +-lr from rounding noise alone, in either run."""
    from data.manifest import load_example, read_manifest
    from pipeline import load_tokenizer

    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    argv = ["--preset=tiny", f"--data_dir={tiny_manifest}", "--device=cpu", "--max_iters=3", "--entropy_weight=0.0"]
    run(argv + [f"--out_dir={one}"])
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(root, "train_tokenizer.py"), *argv, f"--out_dir={two}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=root,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    x = torch.stack([load_example(r, (16, 16))[0] for r in read_manifest(tiny_manifest, "test")])
    with torch.no_grad():
        y1, y2 = (vae.decode(vae.encode(x), clamp=False) for vae in
                  (load_tokenizer(os.path.join(d, "ckpt.pt"))[0] for d in (one, two)))
    # fp32 rounding of a half-batch mean averaged over 2 ranks vs one mean, through 3 AdamW steps: measured 2e-6 on
    # outputs of scale ~2; ranks stepping on their own half-batch gradients (no all-reduce) differ by 1.2
    assert (y1 - y2).abs().max() < 1e-4
