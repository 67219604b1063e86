"""--global_init=looks: the looks' text features in fixed slots, the ridge map from a face to them, and a train.py run
that starts from it (pipeline.looks_targets, pipeline.looks_init, model.ModelConfig.global_face_tokens)."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import train
from checkpoint import load_checkpoint, save_checkpoint
from common import UserError, parse_config
from conftest import write_vocab
from data.synthfaces.judge import Judge
from pipeline import build_hear, build_text_encoder, load_run, looks_init, looks_targets

WORDS = [",", "a", "face", "on", "red", "blue", "wall", "with", "tone", "1", "2", "skin", "dark", "brown", "hair"]
LOOKS = ["with tone 1 skin, red hair", "with tone 2 skin, dark brown hair"]  # trait 2: 2 words or 3


def text_encoder(folder):
    write_vocab(folder, WORDS)
    torch.manual_seed(0)
    with open(os.path.join(folder, "tokenizer.json")) as f:
        encoder, tokenizer, _ = build_text_encoder("tiny", f.read(), channels=128, layers=1, heads=4)
    return encoder.eval(), tokenizer


def features(encoder, tokenizer, text):
    """(T, Ct) features of one caption, encoded alone (no padding)."""
    ids = tokenizer([text], return_tensors="pt")
    with torch.no_grad():
        return encoder(**ids).last_hidden_state[0]


def test_looks_targets_hold_each_trait_in_its_slot(tmp_path):
    encoder, tokenizer = text_encoder(str(tmp_path))
    records = [{"caption_short": "a face on red", "caption_person": LOOKS[0]},
               {"caption_short": "a face on blue wall", "caption_person": LOOKS[1]}]
    y = looks_targets(records, encoder, tokenizer, text_maxlen=32)
    # slots: ", with tone N skin" 5 tokens in both; ", red hair" 3 tokens, ", dark brown hair" 4, so the slot is 4 wide
    assert y.shape == (2, 9, 128)
    # bound: the batch pads the shorter caption with masked keys; fp32 sums of 128 channels differ by ~1e-6
    short = features(encoder, tokenizer, f"a face on red, {LOOKS[0]}")  # caption: 4 tokens
    long = features(encoder, tokenizer, f"a face on blue wall, {LOOKS[1]}")  # caption: 5 tokens
    torch.testing.assert_close(y[1], long[5:14], rtol=0, atol=1e-5)  # the widest wording fills every slot
    torch.testing.assert_close(y[0, :5], short[4:9], rtol=0, atol=1e-5)  # trait 1
    torch.testing.assert_close(y[0, 5:8], short[9:12], rtol=0, atol=1e-5)  # ", red hair"
    torch.testing.assert_close(y[0, 8], short[11], rtol=0, atol=1e-5)  # and "hair" again, to the slot's width
    with pytest.raises(UserError, match="longer than --text_maxlen=12 tokens"):  # 4 + 5 + 3 + </s> = 13
        looks_targets(records[:1], encoder, tokenizer, text_maxlen=12)
    with pytest.raises(UserError, match="same traits"):
        looks_targets(records[:1] + [{"caption_short": "a face", "caption_person": "with tone 1 skin"}],
                      encoder, tokenizer, 32)


def write_records(folder, n=6):
    """n records whose crop_path images are flat colours, half of them with the second wording."""
    rng, records = np.random.default_rng(0), []
    for i in range(n):
        path = os.path.join(folder, f"{i}.png")
        Image.fromarray(rng.integers(0, 255, (1, 1, 3), dtype=np.uint8).repeat(16, 0).repeat(16, 1)).save(path)
        records.append({"crop_path": path, "caption_short": ["a face on red", "a face"][i % 2],
                        "caption_person": LOOKS[i % 2]})
    return records


def test_looks_init_solves_the_ridge_problem_and_starts_the_model(tmp_path):
    encoder, tokenizer = text_encoder(str(tmp_path))
    records, ridge = write_records(str(tmp_path)), 1e-2
    class MeanColour(torch.nn.Module):  # a global encoder of 3 numbers, (B, 3, S, S) -> (B, 1, 3)
        def forward(self, crops):
            return crops.mean((2, 3))[:, None]

    mean_colour = MeanColour()
    weight, bias = looks_init(records, encoder, tokenizer, mean_colour, 16, 1.4, 32, ridge=ridge)
    assert weight.shape == (9 * 128, 3) and bias.shape == (9 * 128,)
    x = torch.stack([torch.from_numpy(np.array(Image.open(r["crop_path"]))).float().mean((0, 1)) / 127.5 - 1
                     for r in records])  # (6, 3): what load_face_crop and mean_colour give, in [-1, 1]
    x1, w = torch.cat([x, torch.ones(6, 1)], 1), torch.cat([weight.T, bias[None]])  # (6, 4), (4, N Ct)
    y = looks_targets(records, encoder, tokenizer, 32).flatten(1)
    # the ridge optimum: the gradient x1^T (x1 w - y) + ridge R w vanishes (bound: fp32 solve of a 4 x 4 system,
    # relative to the size of x1^T y)
    grad = x1.T @ (x1 @ w - y) + ridge * 6 * w
    assert grad.abs().max() < 1e-4 * (x1.T @ y).abs().max()
    # the model starts there: its global face tokens are the regression's prediction, one text-width token per slot
    cfg = parse_config(train.Config, train.PRESETS, ["--preset=tiny"])
    hear, _ = build_hear(cfg, 128, 8, 8, 3, global_start=(weight, bias))
    assert hear.cfg.global_face_tokens == 9
    with torch.no_grad():
        tokens = hear.face_global_proj(x[:, None]).view(6, 9, 128)
        torch.testing.assert_close(tokens.flatten(1), x1 @ w, rtol=0, atol=1e-5)
        c = hear.encode_condition(torch.randn(6, 7, 128), torch.full((6,), 7), x[:, None])
    assert c.kv.shape[1] == 7 + 9 and bool(c.kv_mask.all())


def test_train_with_looks_init(tiny_run, tmp_path):
    data, tok_ckpt, face_ckpt = tiny_run
    records = [json.loads(line) for line in open(f"{data}/manifest.jsonl")]
    with open(f"{data}/manifest.jsonl", "w") as f:
        f.writelines(json.dumps(r | {"crop_path": r["path"]}) + "\n" for r in records)  # crops: the images
    attributes = {k: ["red", "blue"] for k in ("background", "clothing", "accessory", "accessory_color", "expression",
                                                "position", "size", "lighting", "style")}  # the judge's readers
    judge_config = dict(resolution=16, id_size=16, crop_scale=1.4, embed_dim=8, n_ids=3, attributes=attributes)
    save_checkpoint({"model": Judge(**judge_config).state_dict(), "judge_config": judge_config}, f"{tmp_path}/judge.pt")
    argv = ["--preset=tiny", f"--data_dir={data}", f"--tokenizer_ckpt={tok_ckpt}", f"--face_encoder_ckpt={face_ckpt}",
            f"--out_dir={tmp_path}/run", "--device=cpu", "--max_iters=2"]
    with pytest.raises(UserError, match="global_init=words: choose random or looks"):
        train.main(parse_config(train.Config, train.PRESETS, [*argv, "--global_init=words"]))
    with pytest.raises(UserError, match="global_face=judge"):  # the tiny preset's v_g: the face encoder's codes
        train.main(parse_config(train.Config, train.PRESETS, [*argv, "--global_init=looks"]))
    train.main(parse_config(train.Config, train.PRESETS, [*argv, "--global_init=looks",
                                                          f"--global_face=judge:{tmp_path}/judge.pt"]))
    # write_manifest's looks, "with a red face": one slot of 5 tokens (its comma included)
    assert load_checkpoint(f"{tmp_path}/run/ckpt.pt")["model_config"]["global_face_tokens"] == 5
    run = load_run(f"{tmp_path}/run/ckpt.pt")
    assert run.model.hear.face_global_proj.weight.shape == (5 * 128, 8)
