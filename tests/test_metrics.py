"""metrics.py, Table 1 on real photos: CLIP-T, CLIP-I and DINO on tiny random-init transformers CLIP / DINO (ViT)
folders built here (offline), FaceSim on the real dlib backend with skimage's public-domain astronaut() photo."""

import json
import os

import numpy as np
import pytest
import torch
from skimage.data import astronaut

import face_detect as fd
import metrics as mt
from common import UserError

WORDS = "a face on red blue person with wall smiling photo of hat".split()


def write_tiny_clip(folder):
    """A random-init CLIPModel (text + vision towers, 32 px images) with a character-level CLIP BPE tokenizer."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    os.makedirs(folder, exist_ok=True)
    letters = "abcdefghijklmnopqrstuvwxyz"
    tokens = ["<|startoftext|>", "<|endoftext|>"] + list(letters) + [c + "</w>" for c in letters]
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump({t: i for i, t in enumerate(tokens)}, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")  # no merges: every word is spelled out
    tokenizer = CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"))
    tower = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2)
    cfg = CLIPConfig(text_config=dict(vocab_size=len(tokens), max_position_embeddings=77, bos_token_id=0,
                                      eos_token_id=1, pad_token_id=1, **tower),
                     vision_config=dict(image_size=32, patch_size=8, **tower), projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_tiny_dino(folder):
    """A random-init transformers ViTModel in the facebook/dino-vits16 layout (no pooler), 32 px images."""
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(1)
    cfg = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, image_size=32,
                    patch_size=8)
    ViTModel(cfg, add_pooling_layer=False).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("nets")
    clip, tokenizer = mt.load_clip(write_tiny_clip(str(tmp / "clip")))
    return clip, tokenizer, mt.load_dino(write_tiny_dino(str(tmp / "dino")))


def random_images(n, h=40, w=30, seed=0):
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_preprocess_is_resize_shorter_side_centre_crop_normalise():
    gray = torch.full((3, 60, 45), 0.2)  # (0.2 + 1) * 127.5 = 153 on the 0..255 grid
    x = mt.preprocess([gray, random_images(1)[0]], 36, 32, mt.IMAGENET_MEAN, mt.IMAGENET_STD)
    assert x.shape == (2, 3, 32, 32)
    expect = (153 / 255 - torch.tensor(mt.IMAGENET_MEAN)) / torch.tensor(mt.IMAGENET_STD)  # resizing keeps a constant
    assert torch.allclose(x[0], expect.view(3, 1, 1).expand(3, 32, 32), atol=1e-5)
    # the centre crop of a left/right split image keeps the split in the middle column
    split = torch.cat([torch.full((3, 64, 48), -1.0), torch.full((3, 64, 48), 1.0)], dim=2)  # (3, 64, 96)
    y = mt.preprocess([split], 32, 32, (0, 0, 0), (1, 1, 1))[0]  # resized to 32 x 48, 8 columns cut each side
    assert y[:, :, :14].max() < 0.05 and y[:, :, 18:].min() > 0.95


def test_clip_i_and_dino_of_identical_images_are_100(nets):
    clip, _, dino = nets
    images = random_images(3)
    refs = [images[0], images[1], random_images(1, 50, 50, seed=1)[0]]  # references of any size
    for score in (mt.clip_i(clip, images, refs), mt.dino_score(dino, images, refs)):
        # identical pixels give identical unit embeddings: 100 up to fp32 rounding of a 16-384 wide dot product
        assert torch.allclose(score[:2], torch.full((2,), 100.0), atol=1e-3), score
        assert score[2] < 99.9 and -100 <= score[2] <= 100  # a different image is not the same


def test_clip_t_is_100_times_the_cosine_clip_itself_computes(nets):
    clip, tokenizer, _ = nets
    images, prompts = random_images(2), ["a face on red", "a smiling person with a hat"]
    score = mt.clip_t(clip, tokenizer, images, prompts)
    assert score.shape == (2,) and bool(((score >= -100) & (score <= 100)).all())
    # parity with CLIPModel.forward on the same inputs: logits_per_image = exp(logit_scale) * cos
    ids = tokenizer(prompts, padding=True, return_tensors="pt")
    pixels = mt.preprocess(images, 32, 32, mt.CLIP_MEAN, mt.CLIP_STD)
    with torch.no_grad():
        out = clip(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"], pixel_values=pixels)
    assert torch.allclose(score, 100 * out.logits_per_image.diag() / clip.logit_scale.exp(), atol=1e-3)
    assert not torch.allclose(score, mt.clip_t(clip, tokenizer, images, prompts[::-1]))  # the prompt matters


def test_missing_weights_are_one_line_errors(tmp_path):
    for load, key, name in ((mt.load_clip, "clip_model", "openai/clip-vit-large-patch14"),
                            (mt.load_dino, "dino_model", "facebook/dino-vits16")):
        with pytest.raises(UserError) as e:
            load(str(tmp_path / "absent"))
        assert f"--{key}=" in str(e.value) and name in str(e.value) and "\n" not in str(e.value)


def test_face_sim_with_dlib_on_a_real_photo():
    detector = fd.make_face_detector("dlib")
    photo = astronaut()  # (512, 512, 3) uint8
    ref = detector(photo)[0]["embedding"]
    as_tensor = torch.from_numpy(np.ascontiguousarray(photo)).permute(2, 0, 1).float() / 127.5 - 1
    flat = torch.zeros_like(as_tensor)  # no face anywhere
    images = torch.stack([as_tensor, as_tensor.flip(-1), flat])
    scores, found = mt.face_sim(detector, images, [ref, ref, ref])
    # the same photo: its own embedding (uint8 -> [-1, 1] -> uint8 is lossless); mirrored: dlib measured ~99
    assert abs(scores[0] - 100) < 1e-3 and scores[1] > 95, scores
    assert scores[2] == 0 and found.tolist() == [True, True, False]  # no face scores 0 and counts as missing
