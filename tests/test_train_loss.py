"""train.py's loss weights: the face mask of Eq. (2) carried to the bitwise loss (--face_loss_weight); the learning
rate of HEAR's new parameters (--hear_lr_mult)."""

import types

import numpy as np
import pytest
import torch
from PIL import Image

import train
from common import UserError, parse_config, setup_device
from conftest import write_tokenizer_ckpt
from data.manifest import epoch_batches
from model import bitwise_loss, scale_loss_weights
from pipeline import load_tokenizer

# fp32 sums of at most a few hundred weights of size ~1e-2: rounding is ~1e-7, a wrong mask shifts a weight by ~1e-3
TOL = 1e-6


def test_face_token_weights_are_alpha_on_the_face_cells_of_every_scale():
    """Per target and scale, a token whose cell centre lies in the face box weighs alpha x its scale's weight, the
    others 1 x; each row sums to 1; alpha = 1 leaves the scale weights as they are. The mask is computed here cell by
    cell, apart from face_encoder.face_mask."""
    boxes = torch.tensor([[0.075, 0.1, 0.525, 0.65], [0.54, 0.04, 0.96, 0.37]])  # (B, 4) fractions of W, H
    schedule, alpha = [(1, 1), (2, 4), (4, 8)], 3.0
    base = scale_loss_weights(schedule)  # (L,)
    got = train.face_token_weights(boxes, schedule, base, alpha)  # (B, L)
    for row, (x0, y0, x1, y1) in zip(got, boxes.tolist()):
        mask = torch.tensor([alpha if x0 <= (j + 0.5) / w <= x1 and y0 <= (i + 0.5) / h <= y1 else 1.0
                             for h, w in schedule for i in range(h) for j in range(w)])
        want = base * mask / (base * mask).sum()
        assert 1 < mask.sum() - len(mask) < (alpha - 1) * len(mask)  # the box covers some cells, not all
        assert (row - want).abs().max() < TOL and abs(row.sum() - 1) < TOL
    assert train.face_token_weights(boxes, schedule, base, 1.0) is base  # the paper's weights, untouched


def test_target_boxes_are_fractions_of_the_stretched_image(tmp_path):
    """target_latents keeps each target's face box as fractions of width and height: a 40 x 20 image stretched to
    its aspect bucket's 44 x 22 (pn 0.06M, template h/w 0.5, patch 2) keeps its box at the same place."""
    Image.fromarray(np.zeros((20, 40, 3), np.uint8)).save(tmp_path / "wide.png")  # (H, W) = (20, 40)
    records = [{"path": str(tmp_path / "wide.png"), "face_box": [3.0, 2.0, 21.0, 13.0]}]
    vae = load_tokenizer(write_tokenizer_ckpt(str(tmp_path / "tok.pt")))[0]  # patch 2
    state = types.SimpleNamespace(records=records, vae=vae, dist=types.SimpleNamespace(device="cpu"), latents={},
                                  boxes={})
    train.target_latents(state, types.SimpleNamespace(pn="0.06M", image_size=16, cache_features=True), [0], 0.5)
    assert (state.boxes[0] - torch.tensor([3 / 40, 2 / 20, 21 / 40, 13 / 20])).abs().max() < TOL


def test_bitwise_loss_with_one_weight_row_per_sample_is_the_mean_of_the_samples_losses():
    g = torch.Generator().manual_seed(0)
    logits, bits = torch.randn(3, 7, 8, generator=g), torch.randint(0, 2, (3, 7, 4), generator=g)
    w = torch.rand(3, 7, generator=g)
    w = w / w.sum(1, keepdim=True)
    each = [bitwise_loss(logits[b: b + 1], bits[b: b + 1], w[b]) for b in range(3)]
    assert abs(bitwise_loss(logits, bits, w) - torch.stack(each).mean()) < TOL
    assert abs(bitwise_loss(logits, bits, w[0].expand(3, 7)) - bitwise_loss(logits, bits, w[0])) < TOL


def test_face_loss_weight_trains_and_non_positive_weights_or_rates_are_refused(tiny_run, tmp_path):
    data, tok_ckpt, face_ckpt = tiny_run
    argv = ["--preset=tiny", f"--data_dir={data}", f"--tokenizer_ckpt={tok_ckpt}", f"--face_encoder_ckpt={face_ckpt}",
            "--device=cpu", "--max_iters=2"]
    plain = train.main(parse_config(train.Config, train.PRESETS, argv + [f"--out_dir={tmp_path / 'a'}"]))
    faced = train.main(parse_config(train.Config, train.PRESETS, argv + [f"--out_dir={tmp_path / 'b'}",
                                                                          "--face_loss_weight=4"]))
    assert plain[0]["loss"] != faced[0]["loss"] and all(np.isfinite(h["loss"]) for h in faced)
    for bad in ("--face_loss_weight=0", "--hear_lr_mult=-1"):
        with pytest.raises(UserError, match=f"{bad.split('=')[0]}={float(bad.split('=')[1])} must be > 0"):
            train.main(parse_config(train.Config, train.PRESETS, argv + [f"--out_dir={tmp_path / 'c'}", bad]))


def test_hear_lr_mult_scales_the_first_step_of_hears_new_parameters_alone(tiny_run, tmp_path):
    """AdamW's first update, lr x (m / (sqrt(v) + eps) + wd x p), is linear in the lr. From the same weights and the
    same batch, --hear_lr_mult=10 moves HEAR's new parameters (face projections, W'_K, W'_V) 10x as far as 1 does, and
    every pretrained parameter exactly as far."""
    data, tok_ckpt, face_ckpt = tiny_run
    moved = []
    for mult in (1, 10):
        cfg = parse_config(train.Config, train.PRESETS, [
            "--preset=tiny", f"--data_dir={data}", f"--tokenizer_ckpt={tok_ckpt}", f"--face_encoder_ckpt={face_ckpt}",
            f"--out_dir={tmp_path / str(mult)}", "--device=cpu", f"--hear_lr_mult={mult}"])
        torch.manual_seed(cfg.seed)  # as train.main: the same initial weights in both runs
        state = train.build_state(cfg, setup_device("cpu"))
        before = {n: p.detach().clone() for n, p in state.hear.named_parameters()}
        train.train_step(state, cfg, epoch_batches(len(state.records), cfg.batch_size, 0, cfg.seed)[0], 1.0)
        moved.append({n: p.detach() - before[n] for n, p in state.hear.named_parameters()})
    new = set(state.hear.hear_parameter_names())
    assert new and len(new) < len(moved[0]) and all(moved[0][n].abs().max() > 1e-4 for n in new)
    # the weights stay within a few units, so p + delta rounds by <= 1e-6 (x 10 for the scaled delta); a multiplier
    # missing or applied to the wrong parameters is off by about 9 x lr = 1.8e-2
    for n, delta in moved[0].items():
        assert (moved[1][n] - (10 * delta if n in new else delta)).abs().max() < 2e-5, n
