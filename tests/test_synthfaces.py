"""synthfaces: the procedural identity dataset (data/synthfaces/prepare.py), its captions (captions.py) and its judge
(judge.py). Everything runs on the `tiny` presets in a temporary folder: CPU, offline, a few seconds."""

import json
import os
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from common import UserError, parse_config
from data.manifest import caption, read_manifest
from data.synthfaces import captions as C
from data.synthfaces import judge as J
from data.synthfaces import draw as D
from data.synthfaces import prepare as P
from metrics import judge_scores


def _prepare(out_dir, **overrides):
    argv = ["--preset=tiny", f"--out_dir={out_dir}"] + [f"--{k}={v}" for k, v in overrides.items()]
    P.main(parse_config(P.Config, P.PRESETS, argv))
    return str(out_dir)


def _files(root):
    """{relative path: bytes} of every file under root."""
    out = {}
    for d, _, names in os.walk(root):
        for n in names:
            with open(os.path.join(d, n), "rb") as f:
                out[os.path.relpath(os.path.join(d, n), root)] = f.read()
    return out


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return _prepare(tmp_path_factory.mktemp("synthfaces") / "a")


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    """Train the tiny judge once for the module, in a copy of the data (the shared `data_dir` stays as prepare.py
    wrote it, whatever order the tests run in): (metrics, judge.pt path)."""
    judged = shutil.copytree(data_dir, tmp_path_factory.mktemp("synthfaces_judged") / "a")
    cfg = parse_config(J.Config, J.PRESETS, ["--preset=tiny", f"--data_dir={judged}"])
    return J.main(cfg), os.path.join(judged, "judge.pt")


def test_prepare_is_deterministic(data_dir, tmp_path):
    a = _files(data_dir)
    b = _files(_prepare(tmp_path / "b", workers=2))  # same seed, a process pool instead of one process
    assert sorted(a) == sorted(b) and all(a[k] == b[k] for k in a), "same seed must give the same bytes"
    c = _files(_prepare(tmp_path / "c", seed=P.Config.seed + 1))
    assert c["manifest.jsonl"] != a["manifest.jsonl"]
    assert sum(a[k] != c[k] for k in a if k.startswith("images/")) > 0.9 * sum(k.startswith("images/") for k in a)


def test_manifest_fields_paths_and_splits(data_dir):
    cfg = parse_config(P.Config, P.PRESETS, ["--preset=tiny"])
    records = read_manifest(data_dir)
    keys = {"path", "crop_path", "identity", "split", "attributes", "caption_short", "caption_long", "caption_person",
            "face_box"}
    assert all(set(r) == keys for r in records)
    for r in records:
        assert Image.open(r["path"]).size == (cfg.resolution, cfg.resolution)
        assert Image.open(r["crop_path"]).size == (cfg.crop_size, cfg.crop_size)
        assert set(r["attributes"]) == set(C.ATTRIBUTES)
        assert all(v in C.ATTRIBUTES[k] for k, v in r["attributes"].items())
        assert (r["attributes"]["accessory"] == "none") == (r["attributes"]["accessory_color"] == "none")
        x0, y0, x1, y1 = r["face_box"]
        assert 0 <= x0 < x1 <= cfg.resolution and 0 <= y0 < y1 <= cfg.resolution
    train, test = read_manifest(data_dir, "train"), read_manifest(data_dir, "test")
    train_ids, test_ids = {r["identity"] for r in train}, {r["identity"] for r in test}
    assert not train_ids & test_ids, "train and test identities must be disjoint"
    assert (len(train_ids), len(test_ids)) == (cfg.train_ids, cfg.test_ids)
    assert (len(train), len(test)) == (cfg.train_ids * cfg.train_images, cfg.test_ids * cfg.test_images)
    meta = json.load(open(os.path.join(data_dir, "meta.json")))
    assert meta["counts"]["train_images"] == len(train) and meta["attributes"] == C.ATTRIBUTES
    # the face size attribute is visible in the box: mean box height grows small < medium < large
    heights = {s: np.mean([r["face_box"][3] - r["face_box"][1] for r in records if r["attributes"]["size"] == s])
               for s in C.ATTRIBUTES["size"]}
    assert heights["small"] < heights["medium"] < heights["large"]


def test_captions_agree_with_attributes(data_dir):
    records = read_manifest(data_dir)
    rng = np.random.default_rng(0)
    pairs = [(r["attributes"], r["caption_short"], r["caption_long"]) for r in records]
    for _ in range(300):  # and many more contexts than the tiny data holds
        attrs = D.sample_attributes(rng)
        pairs.append((attrs, C.build_caption(attrs), C.build_caption(attrs, long=True)))
    for attrs, short, long in pairs:
        assert C.parse_caption(short) == attrs and C.parse_caption(long) == attrs
        assert len(long) > len(short)
    with pytest.raises(ValueError):
        C.parse_caption("a photo of a person")


def test_face_box_contains_the_face():
    """Flat style, even light: every pixel of exactly the skin colour lies in the box, and the skin spans it."""
    rng = np.random.default_rng(1)
    for k in range(12):
        traits = D.sample_identity(np.random.default_rng([5, k]))
        attrs = dict(D.sample_attributes(rng), style="flat", lighting="even", accessory="none", accessory_color="none",
                     position=C.ATTRIBUTES["position"][k % 3], size=C.ATTRIBUTES["size"][k // 3 % 3])
        image, crop, (x0, y0, x1, y1) = D.render(traits, attrs, resolution=64, jitter=tuple(rng.uniform(-.02, .02, 3)))
        skin = np.abs(np.asarray(image, np.int32) - np.array(traits["skin"])).max(axis=2) <= 2  # (H, W)
        ys, xs = np.nonzero(skin)
        assert len(xs) > 50
        assert xs.min() >= np.floor(x0) - 1 and xs.max() <= np.ceil(x1) and ys.min() >= np.floor(y0) - 1
        assert ys.max() <= np.ceil(y1)
        assert xs.max() - xs.min() > 0.6 * (x1 - x0) and ys.max() - ys.min() > 0.3 * (y1 - y0)  # hair, beard cover some
        # the reference crop is centred on the face: its skin pixels straddle the middle column
        crop_skin = np.abs(np.asarray(crop, np.int32) - np.array(traits["skin"])).max(axis=2) <= 2
        cols = np.nonzero(crop_skin.any(axis=0))[0]
        assert cols.min() < crop.size[0] / 2 < cols.max()


def test_tokenizer_round_trip(data_dir):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    # built from tokenizer.json exactly as train.build_text_encoder builds the caption tokenizer
    with open(os.path.join(data_dir, "tokenizer.json")) as f:
        tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(f.read()), pad_token="<pad>",
                                      eos_token="</s>", unk_token="<unk>")
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    for r in read_manifest(data_dir)[:40]:
        for text in (caption(r, True), caption(r, False), caption(r, True, person=True)):
            ids = tok(text)["input_ids"]
            assert ids[-1] == 1 and 2 not in ids and 0 not in ids  # </s> appended, nothing unknown, no padding
            words = re.findall(r"\w+|[^\w\s]+", text.lower())
            assert tok.decode(ids, skip_special_tokens=True) == " ".join(words)
    batch = tok(["photo of a calm person", "pencil sketch of an angry person in a red shirt"], padding=True)
    assert batch["input_ids"][0][-1] == 0 and batch["attention_mask"][0][-1] == 0
    assert tok("a zebra")["input_ids"] == [tok.convert_tokens_to_ids("a"), 2, 1]


def test_person_phrase_names_each_identitys_traits_and_only_short_captions_get_it(data_dir):
    """Every record's caption_person is the phrase of its identity's traits.json labels; the phrase tells every value
    of every trait it names from the others (a base learns the looks from it), and draw.py's trait names are all
    named but the mole count (which the judge cannot read either)."""
    traits = J.read_traits(data_dir)
    for r in read_manifest(data_dir):
        assert r["caption_person"] == C.person_phrase(traits[r["identity"]])
        assert caption(r, True, True) == f"{r['caption_short']}, {r['caption_person']}"
        assert caption(r, False, True) == r["caption_long"]  # long captions stay without it (text_maxlen)
    assert sorted(C.PERSON) == sorted(set(D.TRAITS) - {"moles"})
    some = traits[next(iter(traits))]
    for name in C.PERSON:
        phrases = {C.person_phrase({**some, name: value}) for value in D.TRAITS[name]}
        assert len(phrases) == len(D.TRAITS[name])
    with pytest.raises(UserError, match="no caption_person"):
        caption({"path": "x.png", "caption_short": "photo of a calm person"}, True, True)


def test_traits_json_holds_each_identitys_drawn_traits(data_dir):
    """traits.json = prepare.trait_labels of the identity drawn from each identity's own generator, every value one of
    TRAITS, and the skin label is the tone the rendered skin colour was jittered from (within the +-10 jitter)."""
    traits = J.read_traits(data_dir)
    meta = json.load(open(f"{data_dir}/meta.json"))
    names = sorted({r["identity"] for r in read_manifest(data_dir)})
    assert sorted(traits) == names
    for split, n in (("train", meta["counts"]["train_ids"]), ("test", meta["counts"]["test_ids"])):
        for k in range(n):
            t = D.sample_identity(D.identity_rng(meta["seed"], split, k))
            name = f"id{k + (0 if split == 'train' else meta['counts']['train_ids']):04d}"
            assert traits[name] == D.trait_labels(t)
            assert all(traits[name][key] in D.TRAITS[key] for key in D.TRAITS)
            tone = D.SKIN_TONES[D.TRAITS["skin"].index(traits[name]["skin"])]
            assert max(abs(a - b) for a, b in zip(t["skin"], tone)) <= 10


def test_judge_learns_and_loads(trained):
    metrics, path = trained
    for name, history in metrics["history"].items():  # [[loss, train accuracy] per epoch]
        if name == "traits":  # fresh identities, and traits a 32 px crop barely shows: accuracy rises, the loss slowly
            assert history[-1][1] >= history[0][1] + 0.15, f"trait readers did not learn: {history}"
        else:
            assert history[-1][0] < 0.7 * history[0][0], f"{name} loss did not go down: {history}"
    assert metrics["id_top1_eval"] >= 2 / 12 and metrics["id_top1_loss"] >= 2 / 12  # chance: 1/12 identities
    assert metrics["attribute_acc"]["position"] > 1 / 3
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert set(raw) == {"model", "judge_config", "config", "metrics"}
    # cached: a second call without --force returns the stored metrics and does not rewrite judge.pt
    mtime = os.path.getmtime(path)
    judged = os.path.dirname(path)
    assert J.main(parse_config(J.Config, J.PRESETS, ["--preset=tiny", f"--data_dir={judged}"])) == metrics
    assert os.path.getmtime(path) == mtime


def test_judge_api(trained, data_dir):
    judge = J.load_judge(trained[1], "cpu")
    records = read_manifest(data_dir, "test")[:4]
    images = torch.stack([torch.from_numpy(np.array(Image.open(r["path"]))).permute(2, 0, 1) for r in records])
    crops = torch.stack([torch.from_numpy(np.array(Image.open(r["crop_path"]))).permute(2, 0, 1) for r in records])
    images, crops = J.to_float(images), J.to_float(crops)  # (4, 3, 64, 64) in [-1, 1]
    boxes = judge.detect(images)
    assert boxes.shape == (4, 4) and (boxes[:, 2:] > boxes[:, :2]).all()
    assert judge.crop(images, boxes, 24).shape == (4, 3, 24, 24)
    logits = judge.classify(images)
    assert {k: v.shape[1] for k, v in logits.items()} == {k: len(v) for k, v in C.ATTRIBUTES.items()}
    # prompt adherence: each attribute's hits by hand; the mean over every (image, attribute) read
    attrs = [r["attributes"] for r in records]
    scores = judge_scores(judge, images, judge.embed(crops, "eval"), torch.arange(4), attrs)
    hand = {a: [float(logits[a][b].argmax() == C.ATTRIBUTES[a].index(attrs[b][a])) for b in range(4)]
            for a in C.ATTRIBUTES}
    assert {a: scores[f"prompt_{a}"].tolist() for a in C.ATTRIBUTES} == hand
    assert scores["prompt_acc"].mean().item() == pytest.approx(sum(map(sum, hand.values())) / (4 * len(hand)))
    # a miss whose read value is one the prompt gives another attribute is misbound; swapping a prompt's background
    # and clothing colours turns those two reads into misbound ones exactly when they were hits
    read = [{a: C.ATTRIBUTES[a][logits[a][b].argmax()] for a in C.ATTRIBUTES} for b in range(4)]
    swapped = [{**at, "background": at["clothing"], "clothing": at["background"]} for at in attrs]
    misbound = judge_scores(judge, images, judge.embed(crops, "eval"), torch.arange(4), swapped)["prompt_misbound"]
    for b, at in enumerate(swapped):
        wrong = [a for a in at if read[b][a] != at[a] and read[b][a] in {v for k, v in at.items() if k != a}]
        assert misbound[b].item() == pytest.approx(len(wrong) / len(at))
        if at["background"] != at["clothing"]:  # the read that matched the true caption is now another's value
            assert {"background", "clothing"} & set(wrong) >= {a for a in ("background", "clothing")
                                                               if read[b][a] == attrs[b][a]}
    for which in ("eval", "loss"):
        e = judge.embed(crops, which)
        assert e.shape == (4, judge.id_eval.embed[1].out_features) and torch.allclose(e.norm(dim=1), torch.ones(4))
    sim = judge.face_sim(images, crops)
    assert sim.shape == (4,) and (sim.abs() <= 1 + 1e-5).all()
    logits = judge.read_traits(images)
    assert {k: tuple(v.shape) for k, v in logits.items()} == {k: (4, len(v)) for k, v in D.TRAITS.items()}
    true = [J.read_traits(data_dir)[r["identity"]] for r in records]
    scores = judge.trait_scores(images, true)  # the share of each image's coarse / fine traits read right
    for group, names in (("coarse_trait", D.COARSE_TRAITS), ("fine_trait", D.FINE_TRAITS)):
        hits = [[logits[t][b].argmax().item() == D.TRAITS[t].index(true[b][t]) for t in names] for b in range(4)]
        assert scores[group].tolist() == pytest.approx([sum(h) / len(names) for h in hits])
    # id_loss is differentiable w.r.t. its input image (it will train the face encoder); the weights stay frozen
    x = images.clone().requires_grad_(True)
    (1 - (judge.embed(judge.crop(x, torch.tensor([r["face_box"] for r in records])), "loss") * judge.embed(
        crops, "loss")).sum(1)).mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in judge.parameters())
    # judge.crop around the true box frames the face as prepare.py's reference crop does
    true = judge.crop(images, torch.tensor([r["face_box"] for r in records]), 16)
    assert (true - J.resize(crops, 16)).abs().mean() < 0.09  # a 3 px shift gives about 0.12


def test_bad_input_is_one_line_error(tmp_path):
    with pytest.raises(UserError):
        read_manifest(str(tmp_path))
    with pytest.raises(UserError):
        J.main(parse_config(J.Config, J.PRESETS, ["--preset=tiny", f"--data_dir={tmp_path}"]))
    with pytest.raises(UserError):
        P.main(parse_config(P.Config, P.PRESETS, ["--preset=tiny", f"--out_dir={tmp_path}", "--train_ids=0"]))
