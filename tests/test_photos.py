"""Real photos end to end: sample.py on skimage's public-domain astronaut() photo through the dlib backend, several
references per person (face_combine mean / concat), text-encoder offload, eval.py --what=photos (Table 1 metrics),
and the real presets' path (aspect templates, face crop of the template's size, CLIP global encoder) on tiny models.
The photo is read from the installed scikit-image package and written to tmp_path, never stored in the repo."""


import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.data import astronaut

import eval as hear_eval
import face_detect as fd
import sample
import train
from common import UserError, parse_config
from pipeline import face_conditions, generate, load_run

FACE = (183, 75, 270, 173)  # astronaut(): hairline to chin, cheek to cheek, measured by eye (tests/test_face_backends)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(tiny trained checkpoint, its data folder, folder with astronaut.png and its mirror mirror.png)."""
    from conftest import train_tiny_run

    tmp = tmp_path_factory.mktemp("photos")
    ckpt, inputs = train_tiny_run(tmp)
    faces = tmp / "faces"
    faces.mkdir()
    Image.fromarray(astronaut()).save(faces / "astronaut.png")
    Image.fromarray(astronaut()[:, ::-1]).save(faces / "mirror.png")
    return ckpt, inputs, str(faces)


def grid_tiles(path, n, h, w):
    """The n tiles (n, 3, h, w) in [-1, 1] of a torchvision.utils.save_image grid (one row, 2 px padding)."""
    grid = torch.from_numpy(np.asarray(Image.open(path).convert("RGB")).copy()).permute(2, 0, 1).float() / 127.5 - 1
    return torch.stack([grid[:, 2: 2 + h, 2 + k * (w + 2): 2 + k * (w + 2) + w] for k in range(n)])


def photo_crop(box):
    image = torch.from_numpy(astronaut()).permute(2, 0, 1).float() / 127.5 - 1
    return fd.square_crop(image[None], torch.tensor(np.array([box], np.float32)), 1.4, 16)[0]


def test_real_photo_through_sample_py(tiny, tmp_path):
    ckpt, _, faces = tiny
    photos = f"{faces}/astronaut.png,{faces}/mirror.png"
    sample.main(parse_config(sample.Config, sample.PRESETS, [
        f"--ckpt={ckpt}", f"--face={photos}", "--face_detector=dlib", "--prompt=a face on red", "--num_samples=2",
        f"--out={tmp_path}/s.png", "--device=cpu"]))
    tiles = grid_tiles(tmp_path / "s.png", 4, 16, 16)  # 2 reference crops, then 2 samples
    box = fd.make_face_detector("dlib")(astronaut())[0]["box"]
    # the crop is the detected face: the crop of the dlib box (to PNG rounding, 0..255 scale), a box on the by-eye
    # face box, and nothing like the crop one face width to the right
    err = [(tiles[0] - photo_crop(b)).abs().mean() * 127.5 for b in (box, np.add(box, (90, 0, 90, 0)))]
    assert err[0] < 0.6 and err[1] > 20, err
    inter = np.prod(np.clip(np.minimum(box[2:], FACE[2:]) - np.maximum(box[:2], FACE[:2]), 0, None))
    assert inter / np.prod(np.subtract(FACE[2:], FACE[:2])) > 0.6, box  # most of the face is inside the dlib box
    mirrored = (tiles[1].flip(-1) - tiles[0]).abs().mean() * 127.5  # the mirror photo's crop is the mirrored crop
    assert mirrored < 0.2 * err[1], (mirrored, err)  # (dlib's box mirrors to within a pixel)


def test_several_references_combine_mean_or_concat(tiny):
    ckpt, _, faces = tiny
    run = load_run(ckpt)
    detector = fd.make_face_detector("dlib")
    from pipeline import face_paths, reference_crops

    crops = reference_crops(face_paths(faces), detector, 16, 1.4)[0]  # (2, 3, 16, 16): astronaut, mirror
    one, same = crops[:1], crops[:1, None].expand(1, 4, -1, -1, -1)  # one reference; four copies of it
    args = (run.model.hear, run.face_encoder, None, None, run.config["hf_first_scale"])

    def tokens(x, combine="mean"):
        return face_conditions(*args[:3], x, args[4], combine)

    g1, h1 = tokens(one)
    gm, hm = tokens(same)
    gc, hc = tokens(same, "concat")
    assert torch.equal(gm, g1) and torch.equal(hm, h1)  # the mean of 4 equal tokens is the token (power of two)
    assert torch.equal(gc, g1) and torch.equal(hc, h1.repeat(1, 4, 1))  # concat: 4 N_hf tokens
    both = tokens(crops[None])  # (1, 2, ...): the photo and its mirror
    assert torch.equal(both[0], (tokens(crops[:1])[0] + tokens(crops[1:])[0]) / 2)

    def images(x, combine):  # id_scale 5: a 2-step model's adapter output is small; this makes it count
        gen = torch.Generator().manual_seed(0)
        return generate(run, ["a face on red"] * 2, x, gen, id_scale=5.0, face_combine=combine)[0]

    single = images(one, "mean")
    assert torch.equal(images(same, "mean"), single)
    # concat: the adapter's softmax over 4 copies of each key is the softmax over one copy, up to fp32 rounding of
    # the logits (~1e-7), which moves a sampled bit only if a uniform draw lands that close to its threshold
    assert torch.allclose(images(same, "concat"), single, atol=1e-4)
    assert not torch.equal(images(crops[None], "mean"), single)  # a second, different photo changes the tokens


def test_offloading_the_text_encoder_changes_nothing(tiny):
    """Same images with and without offload; afterwards the text encoder is on the CPU and the transformer stays on
    the run's device (on a CPU-only machine both are the CPU: the move itself needs a GPU to be exercised)."""
    ckpt, _, faces = tiny
    device = "cuda" if torch.cuda.is_available() else "cpu"
    run = load_run(ckpt, device)
    crops = torch.rand(1, 3, 16, 16, device=device) * 2 - 1

    def images(offload):
        gen = torch.Generator(device=device).manual_seed(0)
        return generate(run, ["a face on red", "a face on blue"], crops, gen, negative_prompt="a blue wall",
                        offload_text_encoder=offload)[0]

    plain = images(False)
    assert torch.equal(images(True), plain) and torch.equal(images(True), plain)  # and again, after the move back
    assert next(run.model.text_encoder.parameters()).device.type == "cpu"
    assert next(run.model.hear.parameters()).device.type == torch.device(device).type


def test_eval_photos_table(tiny, tmp_path):
    from test_metrics import write_tiny_clip, write_tiny_dino

    ckpt, _, faces = tiny
    (tmp_path / "prompts.txt").write_text("# Table 1 prompts\na face on red\n\na face on blue wall\n", "utf-8")
    cfg = parse_config(hear_eval.Config, hear_eval.PRESETS, [
        "--what=photos", f"--ckpt={ckpt}", f"--faces={faces}", f"--prompts={tmp_path}/prompts.txt", "--device=cpu",
        f"--clip_model={write_tiny_clip(str(tmp_path / 'clip'))}", f"--out={tmp_path}/t.md",
        f"--dino_model={write_tiny_dino(str(tmp_path / 'dino'))}", "--face_detector=dlib"])
    table = hear_eval.main(cfg)
    header, _, row = table.splitlines()[:3]
    assert "FaceSim (dlib)" in header and "2 reference photos x 2 prompts" in table
    cells = [c.strip() for c in row.split("|")[2:-1]]
    clip_t, clip_i, dino, face_sim = map(float, cells[:4])
    # 16 px samples of a 2-step model hold no face dlib can find: FaceSim 0, every image counted as face-less
    assert face_sim == 0 and cells[4] == "100.0%" and float(cells[5]) > 0
    assert all(-100 <= v <= 100 for v in (clip_t, clip_i, dino))
    assert open(tmp_path / "t.md").read().strip() == table
    with pytest.raises(UserError, match="--clip_model=.* of openai/clip-vit-large-patch14 there"):
        hear_eval.main(dataclasses.replace(cfg, clip_model=str(tmp_path / "absent")))
    with pytest.raises(UserError, match="FaceSim needs a face backend"):
        hear_eval.main(dataclasses.replace(cfg, face_detector="none"))


def test_real_preset_layout(tiny, tmp_path):
    """The infinity_2b path on tiny models: pn aspect templates, a face crop of the square template's size, CLIP
    global face tokens (transformers CLIPVisionModelWithProjection folder); trained 2 steps, sampled at h/w = 2."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    ckpt, (data, tok_ckpt, face_ckpt), faces = tiny
    clip = str(tmp_path / "clip_vision")
    CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                                   num_attention_heads=2, image_size=32, patch_size=8,
                                                   projection_dim=24)).save_pretrained(clip)
    out = tmp_path / "run"
    train.main(parse_config(train.Config, train.PRESETS, [
        "--preset=tiny", f"--data_dir={data}", f"--tokenizer_ckpt={tok_ckpt}", f"--face_encoder_ckpt={face_ckpt}",
        f"--out_dir={out}", "--device=cpu", "--max_iters=2", "--pn=0.06M", "--face_size=32", "--hf_first_scale=3",
        f"--global_face=clip:{clip}"]))  # 0.06M square template: 16 x 16 latent = 32 px, the face crop's size
    run = load_run(str(out / "ckpt.pt"))
    assert run.global_encoder is not None and run.model.hear.cfg.global_face_dim == 24
    sample.main(parse_config(sample.Config, sample.PRESETS, [
        f"--ckpt={out}/ckpt.pt", f"--face={faces}/astronaut.png", "--face_detector=dlib", "--prompt=a face on red",
        "--num_samples=1", "--h_div_w=2.0", f"--out={tmp_path}/s.png", "--device=cpu"]))
    # template 2.0 at 0.06M ends at 22 x 11 latents: 44 x 22 px samples; the 32 px crop is shown 22 px wide
    assert Image.open(tmp_path / "s.png").size == (2 + 2 * (22 + 2), 2 + 44 + 2)
    crop = grid_tiles(tmp_path / "s.png", 1, 44, 22)[0, :, 11:33]  # the crop tile: 22 x 22, centred, black above
    assert crop.std() > 0.1 and (grid_tiles(tmp_path / "s.png", 1, 44, 22)[0, :, :11] == -1).all()
