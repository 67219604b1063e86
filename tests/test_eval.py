"""eval.py: Table 2 metric definitions and the tokenizer comparison table."""

import math

import torch

import eval as ev
from common import parse_config
from conftest import write_tokenizer_ckpt


def test_metrics_match_their_definitions():
    target = torch.full((2, 3, 8, 8), -1.0)  # grey level 0
    recon = target.clone()
    recon[0, :, :4] = -1 + 2 * 2 / 255  # 2 grey levels off on the top half of image 0 -> MSE 4 / 2 = 2.0
    mse = ev.mse_255(recon, target)
    assert torch.allclose(mse, torch.tensor([2.0, 0.0]))
    assert math.isclose(ev.psnr_from_mse(mse)[0].item(), 10 * math.log10(255**2 / 2.0), rel_tol=1e-6)
    assert ev.psnr_from_mse(mse)[1] == 100  # perfect reconstruction is capped
    boxes = torch.tensor([[0.0, 4.0, 8.0, 8.0], [0.0, 0.0, 8.0, 8.0]])  # bottom half of image 0: no error there
    m = ev.reconstruction_metrics(recon, target, boxes)
    assert m["face_psnr"][0] == 100 and m["ssim"][1] == 1.0


def test_tokenizer_table(tiny_manifest, tmp_path):
    a, b = write_tokenizer_ckpt(str(tmp_path / "a.pt")), write_tokenizer_ckpt(str(tmp_path / "b.pt"), seed=3)
    cfg = parse_config(ev.Config, ev.PRESETS, [f"--ckpts={a},{b}", "--names=plain,face", f"--data_dir={tiny_manifest}",
                                               "--image_size=16", "--device=cpu", f"--out={tmp_path}/t.md"])
    table = ev.main(cfg)
    rows = table.splitlines()
    assert len(rows) == 4 and rows[2].startswith("| plain |") and rows[3].startswith("| face |")
    assert open(tmp_path / "t.md").read().strip() == table
