"""sample.py on a tiny trained checkpoint: output files, determinism, the id_scale and hf_from_scale knobs, one-line
errors."""

import os

import pytest
import torch
from PIL import Image

import sample
import train
from common import UserError, parse_config
from pipeline import generate, load_run


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    from conftest import write_manifest, write_tokenizer_ckpt

    tmp = tmp_path_factory.mktemp("tiny")
    data = write_manifest(str(tmp / "data"))
    tok_ckpt, face_ckpt = write_tokenizer_ckpt(str(tmp / "tok.pt")), write_tokenizer_ckpt(str(tmp / "face.pt"), seed=1)
    out = str(tmp / "run")
    train.main(parse_config(train.Config, train.PRESETS, [
        "--preset=tiny", f"--data_dir={data}", f"--tokenizer_ckpt={tok_ckpt}", f"--face_encoder_ckpt={face_ckpt}",
        f"--out_dir={out}", "--device=cpu"]))
    return os.path.join(out, "ckpt.pt"), os.path.join(data, "0.png")


def run(ckpt, face, tmp_path, *extra):
    cfg = parse_config(sample.Config, sample.PRESETS, [f"--ckpt={ckpt}", f"--face={face}", "--prompt=a face on red",
                                                       f"--out={tmp_path}/s.png", "--num_samples=2", "--device=cpu",
                                                       *extra])
    sample.main(cfg)
    return cfg


def test_sample_writes_grid_and_scale_strip(tiny_ckpt, tmp_path):
    ckpt, face = tiny_ckpt
    run(ckpt, face, tmp_path, "--per_scale=True")
    assert Image.open(tmp_path / "s.png").size[1] >= 16  # reference + 2 samples of 16 px (with padding)
    assert os.path.isfile(tmp_path / "s_scales.png")


def test_sampling_is_seeded_and_id_scale_is_a_knob(tiny_ckpt, tmp_path):
    ckpt, face = tiny_ckpt
    loaded = load_run(ckpt)
    crops = sample.reference_crop(parse_config(sample.Config, {}, [f"--face={face}"]), 16, 1.4, "cpu")
    crops = crops.expand(2, -1, -1, -1)

    def images(seed, id_scale=1.0):
        gen = torch.Generator().manual_seed(seed)
        return generate(loaded, ["a face on red"] * 2, crops, gen, cfg_scale=3.0, id_scale=id_scale)[0]

    a, b = images(0), images(0)
    assert torch.equal(a, b)
    assert not torch.equal(images(0, id_scale=0.0), images(0, id_scale=5.0))


def test_hf_from_scale_past_the_last_scale_is_id_scale_zero(tiny_ckpt, tmp_path):
    """The adapter switched off at every scale (hf_from_scale beyond the K scales) samples exactly what id_scale 0
    samples; from scale 0 it is the plain id_scale knob, which changes the images."""
    ckpt, face = tiny_ckpt
    pixels = {}
    for name, flags in (("off", ["--id_scale=0"]), ("late", ["--id_scale=5", "--hf_from_scale=99"]),
                        ("on", ["--id_scale=5", "--hf_from_scale=0"])):
        os.makedirs(tmp_path / name)
        run(ckpt, face, tmp_path / name, *flags)
        pixels[name] = torch.tensor(list(Image.open(tmp_path / name / "s.png").getdata()))
    assert torch.equal(pixels["late"], pixels["off"])
    assert not torch.equal(pixels["on"], pixels["off"])


def test_bad_inputs(tiny_ckpt, tmp_path):
    ckpt, face = tiny_ckpt
    (tmp_path / "broken.jpg").write_bytes(b"\x00\x01")
    with pytest.raises(UserError, match="is not an image file"):
        run(ckpt, str(tmp_path / "broken.jpg"), tmp_path)
    with pytest.raises(UserError, match="--face is required"):
        run(ckpt, "", tmp_path)
    with pytest.raises(UserError, match="not a train.py checkpoint"):
        torch.save({"model": {}}, tmp_path / "other.pt")
        run(str(tmp_path / "other.pt"), face, tmp_path)
    with pytest.raises(ValueError, match="model pack 'buffalo_l' not found"):
        run(ckpt, face, tmp_path, "--face_detector=insightface", f"--face_model_root={tmp_path}")
