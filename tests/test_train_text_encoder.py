"""train_text_encoder.py: the masking rule, resume == uninterrupted, and train.py reading the pretrained encoder
(--text_init) frozen or trained on."""

import os

import pytest
import torch

import train
import train_text_encoder as tte
from checkpoint import load_checkpoint
from common import UserError, parse_config


def pretrain(data, out, *extra):
    tte.main(parse_config(tte.Config, tte.PRESETS, ["--preset=tiny", f"--data_dir={data}", f"--out_dir={out}",
                                                    "--device=cpu", *extra]))
    return os.path.join(out, "ckpt.pt")


def test_masking_chooses_word_tokens_only_and_replaces_them_as_bert_does():
    ids = torch.tensor([[5, 6, 7, 8, 1, 0, 0]]).repeat(4000, 1)  # four words, </s>, two pads
    inputs, chosen = tte.mask_words(ids, (ids != 0).long(), torch.Generator().manual_seed(0), 0.15, 98)
    assert not chosen[:, 4:].any() and torch.equal(inputs[~chosen], ids[~chosen])  # </s>, pads, the rest: untouched
    # 16,000 word tokens: the chosen share has a binomial std of 0.003, so 0.015 is 5 std; of the ~2400 chosen, each
    # replacement share has a std under 0.009, so 0.04 is over 4 std
    assert abs(chosen[:, :4].float().mean() - 0.15) < 0.015
    new = inputs[chosen]
    assert abs((new == tte.MASK).float().mean() - 0.8) < 0.04
    random = (new != tte.MASK) & (new != ids[chosen])  # a random word equal to the original counts as kept
    assert abs(random.float().mean() - 0.1 * 94 / 95) < 0.04 and (new[random] > tte.MASK).all()


def test_resume_equals_uninterrupted(tiny_manifest, tmp_path):
    full = pretrain(tiny_manifest, str(tmp_path / "a"))
    pretrain(tiny_manifest, str(tmp_path / "b"), "--max_iters=2")  # the lr of steps 0, 1 is the same (warmup 1)
    part = pretrain(tiny_manifest, str(tmp_path / "b"), "--init_from=resume")
    a, b = load_checkpoint(full), load_checkpoint(part)
    assert a["step"] == b["step"] == 6
    assert all(torch.equal(a["text_encoder"][k], b["text_encoder"][k]) for k in a["text_encoder"])


def test_train_reads_the_pretrained_encoder_frozen_or_trains_it_on(tiny_run, tmp_path):
    data, tok_ckpt, face_ckpt = tiny_run
    text = load_checkpoint(pretrain(data, str(tmp_path / "text")))["text_encoder"]
    runs = {}
    for frozen in (True, False):
        out = str(tmp_path / f"frozen_{frozen}")
        train.main(parse_config(train.Config, train.PRESETS, [
            "--preset=tiny", f"--data_dir={data}", f"--tokenizer_ckpt={tok_ckpt}", f"--face_encoder_ckpt={face_ckpt}",
            f"--out_dir={out}", "--device=cpu", f"--text_init={tmp_path / 'text' / 'ckpt.pt'}",
            f"--train_text={not frozen}"]))
        runs[frozen] = load_checkpoint(os.path.join(out, "ckpt.pt"))["text_encoder"]
    # frozen: the pretrained weights, bit for bit, after 4 steps; trained: they moved
    assert all(torch.equal(runs[True][k], text[k]) for k in text)
    assert any(not torch.equal(runs[False][k], text[k]) for k in text)


def test_bad_text_init_is_a_one_line_error(tiny_run, tmp_path):
    data, tok_ckpt, face_ckpt = tiny_run
    base = ["--preset=tiny", f"--data_dir={data}", f"--tokenizer_ckpt={tok_ckpt}", f"--face_encoder_ckpt={face_ckpt}",
            f"--out_dir={tmp_path / 'run'}", "--device=cpu"]
    with pytest.raises(UserError, match="not found; make it with python train_text_encoder.py"):
        train.main(parse_config(train.Config, train.PRESETS, [*base, f"--text_init={tmp_path / 'none.pt'}"]))
    with pytest.raises(UserError, match="not a train_text_encoder.py checkpoint"):
        train.main(parse_config(train.Config, train.PRESETS, [*base, f"--text_init={tok_ckpt}"]))
    with pytest.raises(UserError, match="use scratch or resume"):
        pretrain(data, str(tmp_path / "t"), f"--init_from={tok_ckpt}")


def test_a_batch_with_no_word_chosen_is_a_zero_loss_not_a_nan(tiny_manifest, tmp_path):
    ckpt = load_checkpoint(pretrain(tiny_manifest, str(tmp_path / "t"), "--mask_prob=0.0"))
    assert all(torch.isfinite(w).all() for w in ckpt["text_encoder"].values())
    lines = [line for line in open(tmp_path / "t" / "log.txt") if "| loss " in line]
    assert len(lines) == 6 and all("loss 0.0000 | masked-word accuracy 0.000" in line for line in lines)


def test_person_captions_reach_the_text_encoder_and_the_base(tiny_run, tmp_path):
    """The person's looks (caption_person) join the text encoder's corpus as short caption + phrase, and train.py
    --person_caption_prob puts them in the base's captions: the same run with and without them differs only there;
    a manifest without the field is a one-line error."""
    data, tok_ckpt, face_ckpt = tiny_run
    cfg = parse_config(tte.Config, tte.PRESETS, ["--preset=tiny", f"--data_dir={data}"])
    ids, _ = tte.caption_ids(cfg, train.build_text_encoder("tiny", train.read_vocab(data), 32, 1, 2)[1])
    assert len(ids) == 3 * 12  # short, long, short + looks of each of the 12 training images (4 held-out ones: none)
    runs = []
    for person in (0.0, 1.0):
        out = str(tmp_path / f"person_{person}")
        train.main(parse_config(train.Config, train.PRESETS, [
            "--preset=tiny", f"--data_dir={data}", f"--tokenizer_ckpt={tok_ckpt}", f"--face_encoder_ckpt={face_ckpt}",
            f"--out_dir={out}", "--device=cpu", "--short_caption_prob=1", f"--person_caption_prob={person}"]))
        runs.append(load_checkpoint(os.path.join(out, "ckpt.pt"))["model"])
    assert any(not torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    path = os.path.join(data, "manifest.jsonl")
    lines = [line.replace(', "caption_person"', ', "_"') for line in open(path)]
    open(path, "w").writelines(lines)
    with pytest.raises(UserError, match="no caption_person in its manifest record"):
        train.main(parse_config(train.Config, train.PRESETS, [
            "--preset=tiny", f"--data_dir={data}", f"--tokenizer_ckpt={tok_ckpt}", f"--face_encoder_ckpt={face_ckpt}",
            f"--out_dir={tmp_path / 'none'}", "--device=cpu", "--person_caption_prob=1"]))
