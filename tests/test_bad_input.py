"""Bad input to sample.py (and eval.py --what=photos): images, prompts, checkpoints and config values each give a
one-line error saying what is wrong and what to do (or a one-line warning), before anything is written. Every bad
file is built here in tmp_path; the real photo is skimage's astronaut(), read from the installed package."""

import dataclasses
import os
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.data import astronaut

import face_detect as fd
from data.curation import read_prompt_lines  # eval.py --prompts, curate.py --synth_prompts
import sample
from checkpoint import save_checkpoint
from common import UserError, parse_config
from data.manifest import image_size, load_image
from pipeline import face_paths, reference_crops


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(tiny train.py checkpoint (16 px, face_size 16, hf_first_scale 2), its tokenizer checkpoint, a good face)."""
    from conftest import train_tiny_run

    ckpt, (data, tok_ckpt, _) = train_tiny_run(tmp_path_factory.mktemp("bad"))
    return ckpt, tok_ckpt, os.path.join(data, "0.png")


def sample_main(ckpt, face, out, *extra):
    sample.main(parse_config(sample.Config, sample.PRESETS, [
        f"--ckpt={ckpt}", f"--face={face}", "--prompt=a face on red", f"--out={out}", "--num_samples=1",
        "--device=cpu", *extra]))


def bomb_png(path, side=30000):
    """A PNG whose header claims side x side RGB pixels (2.7 GB decoded) over a few bytes of data."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)  # 8-bit RGB
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return str(path)


def as_uint8(x):
    return ((x.permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()  # (3, H, W) [-1, 1] -> (H, W, 3) uint8


def test_image_modes_become_the_right_rgb(tmp_path):
    rgb = (np.random.default_rng(0).random((24, 32, 3)) * 255).astype(np.uint8)
    grey = rgb[..., 0]
    cases = {"grey.png": (Image.fromarray(grey), np.repeat(grey[..., None], 3, -1), 0),
             "palette.png": (Image.fromarray(rgb).quantize(64), None, 0),
             "cmyk.tif": (Image.fromarray(rgb).convert("CMYK"), rgb, 0),  # PIL's CMYK <-> RGB is exact
             "cmyk.jpg": (Image.fromarray(rgb).convert("CMYK"), rgb, 3)}  # JPEG loss (measured mean 0.1)
    for name, (img, want, tol) in cases.items():
        img.save(tmp_path / name, **({"quality": 100} if name.endswith("jpg") else {}))
        want = np.asarray(img.convert("RGB")) if want is None else want
        got = as_uint8(load_image(str(tmp_path / name)))
        assert np.abs(got.astype(int) - want).mean() <= tol, name
    # 16-bit grey: 0..65535 scaled to 0..255 (PIL's convert alone clips everything above 255 to white)
    deep = (np.arange(24 * 32).reshape(24, 32) * 85).astype(np.uint16)  # 0 .. 65195
    Image.fromarray(deep).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I;16")
    assert np.array_equal(as_uint8(load_image(str(tmp_path / "deep.png")))[..., 1], np.round(deep / 257))
    # RGBA: opaque pixels unchanged, transparent ones white whatever colour they hide
    alpha = np.where(np.arange(32) < 16, 255, 0).astype(np.uint8)[None].repeat(24, 0)
    Image.fromarray(np.dstack([rgb, alpha])).save(tmp_path / "rgba.png")
    got = as_uint8(load_image(str(tmp_path / "rgba.png")))
    assert np.array_equal(got[:, :16], rgb[:, :16]) and (got[:, 16:] == 255).all()


def test_exif_rotated_photo_gives_the_upright_face(tmp_path):
    """A phone photo stored sideways with EXIF orientation 6 (display rotated 90 degrees clockwise): read upright,
    the detected face and its crop are those of the upright photo."""
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.ascontiguousarray(np.rot90(astronaut()))).save(tmp_path / "phone.png", exif=exif)
    Image.fromarray(astronaut()).save(tmp_path / "upright.png")
    assert image_size(str(tmp_path / "phone.png")) == (512, 512) and np.array_equal(
        as_uint8(load_image(str(tmp_path / "phone.png"))), astronaut())
    stored = np.ascontiguousarray(np.rot90(astronaut()[:200, :300]))  # (300, 200): sides swapped on disk
    Image.fromarray(stored).save(tmp_path / "tall.png", exif=exif)
    assert image_size(str(tmp_path / "tall.png")) == (300, 200)  # (w, h) as shown: the manifest's face boxes
    detector = fd.make_face_detector("dlib")
    crops, faces = reference_crops([str(tmp_path / "phone.png"), str(tmp_path / "upright.png")], detector, 64, 1.4)
    assert np.allclose(faces[0]["box"], faces[1]["box"]) and torch.equal(crops[0], crops[1])


def test_bad_image_files(tmp_path, capsys):
    jpeg = tmp_path / "cut.jpg"
    Image.fromarray(astronaut()).save(jpeg)
    jpeg.write_bytes(jpeg.read_bytes()[:20000])  # a copy that stopped half way
    (tmp_path / "notes.png").write_text("not an image")
    Image.new("RGB", (1, 1)).save(tmp_path / "dot.png")
    (tmp_path / "folder").mkdir()
    cases = {"missing.png": r"missing.png does not exist", "folder": "is a folder, not an image file",
             "notes.png": "is not an image file PIL can read", "cut.jpg": "cut.jpg is truncated or damaged",
             "dot.png": "is 1x1 pixels: too small to hold a face",
             bomb_png(tmp_path / "bomb.png"): r"\(900000000 pixels\) exceeds limit .* Refused; shrink the image"}
    for name, message in cases.items():
        with pytest.raises(UserError, match=message):
            reference_crops([str(tmp_path / name)], None, 16, 1.4)
    with pytest.raises(UserError, match="no face found in .*flat.png"):
        Image.new("RGB", (128, 128), "grey").save(tmp_path / "flat.png")
        reference_crops([str(tmp_path / "flat.png")], fd.make_face_detector("dlib"), 16, 1.4)
    with pytest.raises(UserError, match="no images"):
        face_paths(str(tmp_path / "folder"))


def test_two_faces_use_the_largest_with_one_warning(tmp_path, capsys):
    canvas = Image.new("RGB", (896, 512), "white")
    canvas.paste(Image.fromarray(astronaut()), (0, 0))
    canvas.paste(Image.fromarray(astronaut()).resize((384, 384)), (512, 64))  # the same face at 3/4 size
    canvas.save(tmp_path / "two.png")
    _, faces = reference_crops([str(tmp_path / "two.png")], fd.make_face_detector("dlib"), 16, 1.4)
    assert faces[0]["box"][2] < 512  # the larger face, in the left photo
    lines = [s for s in capsys.readouterr().out.splitlines() if "warning" in s]
    assert lines == [f"warning: 2 faces found in {tmp_path}/two.png; using the largest"]


def test_small_face_and_long_prompt_warn_in_one_line(tiny, tmp_path, capsys):
    ckpt, _, face = tiny
    Image.open(face).resize((12, 12)).save(tmp_path / "small.png")  # a 12 px crop for a 16 px, 5-scale encoder
    words = ("a face on red " * 400)[:5000]  # 5000 characters, 1250 words of the tiny vocabulary
    sample_main(ckpt, tmp_path / "small.png", tmp_path / "s.png", f"--prompt={words}")
    lines = [s for s in capsys.readouterr().out.splitlines() if "warning" in s]
    assert lines == [
        f"warning: --prompt is {len(words.split()) + 1} tokens long (5000 characters); kept the first 80 tokens "
        "(this checkpoint's text_maxlen)",  # + 1: the end token
        # scale 5 (16 px) is finer than the 12 px crop; scales 3, 4 (8, 12 px) are not
        f"warning: the face in {tmp_path}/small.png is 12x12 px (a 12 px crop, upscaled to 16): high-frequency "
        "scale 5 is finer than the photo, without detail of its own; a photo with a larger face keeps more identity"]
    assert os.path.isfile(tmp_path / "s.png")
    with pytest.raises(UserError, match="--prompt is required \\(and not blank\\)"):
        sample_main(ckpt, face, tmp_path / "s.png", "--prompt= \t ")


def test_prompt_file_that_is_not_utf8(tmp_path):
    (tmp_path / "p.txt").write_bytes("a face on red\nun caf\u00e9\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"--prompts=.*p.txt line 2: byte 0xe9 is not UTF-8; save the file as UTF-8"):
        read_prompt_lines(str(tmp_path / "p.txt"), "--prompts")
    (tmp_path / "p.txt").write_text("# only a comment\n\n   \n")
    with pytest.raises(UserError, match="holds no prompt"):
        read_prompt_lines(str(tmp_path / "p.txt"), "--prompts")
    with pytest.raises(UserError, match="cannot read it"):
        read_prompt_lines(str(tmp_path / "missing.txt"), "--prompts")
    (tmp_path / "p.txt").write_text("# Table 1\n a face on red \n\nun caf\u00e9\n", encoding="utf-8")
    assert read_prompt_lines(str(tmp_path / "p.txt"), "--prompts") == ["a face on red", "un caf\u00e9"]


def test_bad_checkpoints(tiny, tmp_path):
    from safetensors.torch import save_file

    ckpt, tok_ckpt, face = tiny
    out = tmp_path / "s.png"
    with pytest.raises(UserError, match="is a train_tokenizer.py checkpoint .*--ckpt takes a train.py checkpoint"):
        sample_main(tok_ckpt, face, out)
    data = open(ckpt, "rb").read()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="cut.pt is truncated or not a loadable checkpoint"):
        sample_main(tmp_path / "cut.pt", face, out)
    full = torch.load(ckpt, weights_only=True)
    edited = {**full, "ema": None, "model": {**full["model"], "word_embed.weight": torch.zeros(3, 3)}}
    save_checkpoint(edited, str(tmp_path / "edited.pt"))
    with pytest.raises(UserError, match=r"edited.pt: the weights do not fit .*\(1 shape mismatch .*: word_embed"):
        sample_main(tmp_path / "edited.pt", face, out)
    from conftest import write_tokenizer_ckpt  # the run's tokenizer file replaced by one of 16 bits per token

    other = {**full, "config": {**full["config"], "tokenizer_ckpt": write_tokenizer_ckpt(str(tmp_path / "t16.pt"), 16)}}
    save_checkpoint(other, str(tmp_path / "other.pt"))
    with pytest.raises(UserError, match="has 16 bits per token, the transformer was trained on 8"):
        sample_main(tmp_path / "other.pt", face, out)
    vae = {k: v.contiguous() for k, v in torch.load(tok_ckpt, weights_only=True)["model"].items()}
    save_file({k: v for k, v in vae.items() if k != "decoder.conv_out.conv.bias"}, str(tmp_path / "vae.safetensors"))
    spec = f"infinity:{tmp_path}/vae.safetensors"
    save_checkpoint({**full, "config": {**full["config"], "tokenizer_ckpt": spec}}, str(tmp_path / "st.pt"))
    with pytest.raises(UserError, match=r"vae.safetensors: .* do not fit the BSQVAE \(1 missing: decoder.conv_out"):
        sample_main(tmp_path / "st.pt", face, out)
    assert not out.exists()  # nothing written by any of them


def test_config_values_checked_before_any_work(tiny, tmp_path):
    ckpt, _, face = tiny
    absent = str(tmp_path / "absent.pt")  # a value error must come before the checkpoint is even looked at
    cases = {"--cfg=-1": "--cfg=-1.0: must be >= 0", "--top_p=1.5": r"--top_p=1.5: must be in \[0, 1\]",
             "--num_samples=0": "--num_samples=0: must be >= 1", "--h_div_w=5": r"--h_div_w=5.0: must be in \[0.333, 3",
             "--tau=0": "--tau=0.0: must be > 0", "--face_combine=sum": "--face_combine=sum: must be mean or concat",
             "--id_scale=nan": "--id_scale=nan: not a finite number", "--num_samples=2.5": "expected int",
             "--seeds=1": "unknown config key --seeds; did you mean --seed?", "--out=s.gif2": "not an image format",
             f"--out={face}/s.png": "cannot write in .*0.png .*choose another --out",  # a file in the way
             f"--out={tmp_path}": "is a folder; give a file name"}
    for arg, message in cases.items():
        with pytest.raises(UserError, match=message):
            sample_main(absent, face, tmp_path / "s.png", arg)
    cfg = parse_config(sample.Config, sample.PRESETS, [f"--ckpt={ckpt}", f"--face={face}", "--prompt=a face"])
    with pytest.raises(UserError, match="--id_scale=nan: must be finite"):
        sample.main(dataclasses.replace(cfg, id_scale=float("nan")))  # the API path, past parse_config
    with pytest.raises(UserError, match="--h_div_w=2.0: this checkpoint was trained on square images only"):
        sample_main(ckpt, face, tmp_path / "s.png", "--h_div_w=2")
    assert not (tmp_path / "s.png").exists()
