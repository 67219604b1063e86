"""curate.py end to end with the real dlib face backend on a folder that mixes real photos shipped by installed
packages (scikit-image, insightface), synthfaces renders, non-images, a truncated file, duplicates, face-less
images, a group photo and a face too small in its frame; then the manifest read back by train.py's loader and a
two-step training run on it."""

import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

import curate
import train
from common import parse_config
from conftest import write_tokenizer_ckpt, write_vocab
from data.manifest import read_manifest
from data.synthfaces.draw import identity_rng, render, sample_attributes, sample_identity
from test_curate_models import SCRIPT, config, tiny_vlm
from test_curate_stages import bomb_png



def insightface_image(name):
    import insightface

    path = os.path.join(os.path.dirname(insightface.__file__), "data", "images", name)
    return Image.open(path).convert("RGB")


def synthface(ordinal, side=256):
    """A synthfaces render (train identity `ordinal`, seed 0), large photo-style face."""
    rng = identity_rng(0, "train", ordinal)
    traits, attrs = sample_identity(rng), sample_attributes(rng)
    attrs.update(style="photo", size="large")
    return render(traits, attrs, resolution=side, rng=rng)[0]


def mixed_folder(root):
    """18 files in three sub-folders; the expected fate of each is in the comment after it."""
    for sub in ("photos", "synthfaces", "trash"):
        os.makedirs(f"{root}/{sub}", exist_ok=True)
    astronaut = Image.fromarray(skdata.astronaut())
    astronaut.save(f"{root}/photos/astronaut.png")  # face (person A)
    astronaut.transpose(Image.FLIP_LEFT_RIGHT).save(f"{root}/photos/astronaut_mirror.png")  # face (A)
    astronaut.crop((64, 0, 448, 384)).save(f"{root}/photos/astronaut_crop.jpg", quality=95)  # face (A)
    insightface_image("Tom_Hanks_54745.png").save(f"{root}/photos/hanks.png")  # face (B), 112 px
    insightface_image("t1.jpg").save(f"{root}/photos/group.jpg")  # several faces
    Image.fromarray(skdata.chelsea()).save(f"{root}/photos/chelsea.png")  # a cat: no face
    Image.fromarray(skdata.coffee()).save(f"{root}/photos/coffee.png")  # no face
    canvas = Image.new("RGB", (1000, 1000), (128, 128, 128))
    canvas.paste(astronaut, (244, 244))
    canvas.save(f"{root}/photos/far_away.jpg", quality=90)  # face box 90 px of 1000: too small (< 0.1)
    for k in (0, 3, 4):
        synthface(k).save(f"{root}/synthfaces/id{k}.png")  # HOG finds the drawn faces of 3 and 4, not of 0
    open(f"{root}/trash/readme.txt", "w").write("not an image")  # not an image
    np.save(f"{root}/trash/array.npy", np.zeros(10))  # not an image
    astronaut.save(f"{root}/trash/cut.jpg", quality=90)
    data = open(f"{root}/trash/cut.jpg", "rb").read()
    open(f"{root}/trash/cut.jpg", "wb").write(data[: len(data) * 6 // 10])  # truncated
    shutil.copy(f"{root}/photos/astronaut.png", f"{root}/trash/astronaut_copy.png")  # exact duplicate
    astronaut.resize((400, 400)).save(f"{root}/trash/astronaut_400.jpg", quality=85)  # near duplicate
    Image.fromarray(skdata.coffee()).resize((64, 48)).save(f"{root}/trash/thumb.png")  # too small
    bomb_png(f"{root}/trash/bomb.png")  # decompression bomb
    return root


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("curate_mixed")
    # same person iff dlib cosine >= 0.95: the astronaut's three images score 0.99 with each other, while the two
    # drawn faces score 0.90 with each other and Hanks 0.87-0.89 with them (dlib's own rule, ~0.9, is too close)
    argv = [f"--inputs={mixed_folder(str(tmp / 'raw'))}", f"--vlm_model={tiny_vlm(str(tmp / 'vlm'), SCRIPT)}",
            "--face_detector=dlib", "--det_max_side=640", "--min_side=96", "--max_new_tokens=32",
            "--identity_threshold=0.95", "--test_fraction=0.25", "--vlm_batch=6"]
    summary = curate.main(config(tmp, *argv))
    torch.set_num_threads(threads)
    return tmp, summary


def test_mixed_folder_counts_with_dlib(mixed_run):
    tmp, summary = mixed_run
    st = summary["stages"]
    assert (st["scan"]["in"], st["scan"]["kept"]) == (18, 13)
    assert st["scan"]["dropped"] == {"decompression bomb": 1, "not an image": 2, "too small": 1,
                                     "truncated or corrupt": 1}
    assert st["dedup"]["dropped"] == {"exact duplicate": 1, "near duplicate": 1}
    assert (st["detect"]["in"], st["detect"]["kept"]) == (11, 6)
    assert st["detect"]["dropped"] == {"face too small": 1, "no face": 3, "several faces": 1}
    assert [st[s]["kept"] for s in ("vlm_filter", "recaption")] == [6, 6]
    lines = read_manifest(str(tmp / "out"))
    names = sorted(os.path.basename(r["path"]) for r in lines)
    assert names == ["astronaut.png", "astronaut_crop.jpg", "astronaut_mirror.png", "hanks.png", "id3.png", "id4.png"]
    person = {os.path.basename(r["path"]): r["identity"] for r in lines}
    assert person["astronaut.png"] == person["astronaut_mirror.png"] == person["astronaut_crop.jpg"]
    assert len(set(person.values())) == 4 and summary["persons"] == 4
    split = {}
    for r in lines:
        split.setdefault(r["identity"], set()).add(r["split"])
    assert all(len(s) == 1 for s in split.values()) and sum(s == {"test"} for s in split.values()) == 1
    box = next(r["face_box"] for r in lines if r["path"].endswith("/astronaut.png"))
    assert 160 < box[0] < 200 and 60 < box[1] < 100 and 250 < box[2] < 290  # the face, in full-size pixels
    mirror = next(r["face_box"] for r in lines if r["path"].endswith("astronaut_mirror.png"))
    assert abs(mirror[0] - (512 - box[2])) < 4 and abs(mirror[2] - (512 - box[0])) < 4


def test_manifest_trains_two_steps(mixed_run, tmp_path, one_thread):
    tmp, _ = mixed_run
    out = str(tmp / "out")
    records = read_manifest(out, "train")
    words = sorted({w for r in records for w in (r["caption_short"] + " " + r["caption_long"]).split()})
    write_vocab(out, words)
    argv = ["--preset=tiny", f"--data_dir={out}", f"--tokenizer_ckpt={write_tokenizer_ckpt(str(tmp_path / 't.pt'))}",
            f"--face_encoder_ckpt={write_tokenizer_ckpt(str(tmp_path / 'f.pt'), seed=1)}", "--max_iters=2",
            f"--batch_size={min(4, len(records))}", f"--out_dir={tmp_path / 'run'}", "--device=cpu"]
    history = train.main(parse_config(train.Config, train.PRESETS, argv))
    assert len(history) == 2 and all(np.isfinite(h["loss"]) for h in history)
