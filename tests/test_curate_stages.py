"""curate.py stage mechanics with tiny models and --face_detector=none: drop reasons and their counts, answer
parsing with a random VLM, the 3:1 export with synthetic images, resume after a kill in every stage, two shards ==
one run, and the one-line errors for bad input."""

import glob
import json
import os
import shutil
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import curate
from common import UserError
from data import curation as cu
from data import vlm_prompts as vp
from data.manifest import read_manifest
from test_curate_models import SCRIPT, config, tiny_sd3, tiny_text_model, tiny_vlm


def blobs(seed, size=160):
    """A smooth random image (8x8 colours, bicubic): distinct pHashes for distinct seeds."""
    small = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((size, size), Image.BICUBIC)


def bomb_png(path, side=30000):
    """A 2 KB PNG that claims side x side pixels: PIL refuses it at open (a decompression bomb)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 2000))
                + chunk(b"IEND", b""))


def make_folder(root):
    """12 files (and a hidden one): 6 distinct images, an exact and a near duplicate, a text file, a truncated PNG,
    a 40 px image and a decompression bomb."""
    os.makedirs(f"{root}/sub", exist_ok=True)
    for i in range(6):
        blobs(i).save(f"{root}/a{i}.png")
    shutil.copy(f"{root}/a0.png", f"{root}/sub/a0_copy.png")
    blobs(1).resize((150, 150)).save(f"{root}/sub/a1_small.jpg", quality=80)
    open(f"{root}/notes.txt", "w").write("not an image\n")
    open(f"{root}/.DS_Store", "wb").write(b"\0\1")
    data = open(f"{root}/a2.png", "rb").read()
    open(f"{root}/cut.png", "wb").write(data[: len(data) // 2])
    blobs(7, 40).save(f"{root}/tiny.png")
    bomb_png(f"{root}/bomb.png")
    return root


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("curate_models")
    return {"vlm": tiny_vlm(str(root / "vlm"), SCRIPT), "random": tiny_vlm(str(root / "random")),
            "mute": tiny_vlm(str(root / "mute"), ""), "sd3": tiny_sd3(str(root / "sd3")),
            "lm": tiny_text_model(str(root / "lm"), "Enhanced Prompt: a man with olive skin")}


def args(models, folder, prompts, *extra):
    return [f"--inputs={folder}", f"--vlm_model={models['vlm']}", f"--synth_prompts={prompts}", "--synth_count=2",
            f"--refiner_model={models['lm']}", f"--synth_model={models['sd3']}", "--synth_size=32", "--synth_steps=2",
            "--face_detector=none", "--max_new_tokens=32", "--vlm_batch=3", "--test_fraction=0.25", *extra]


@pytest.fixture(scope="module")
def reference(models, tmp_path_factory):
    """One full run on the folder: (tmp dir, argv, summary)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("curate_ref")
    folder = make_folder(str(tmp / "raw"))
    (tmp / "prompts.txt").write_text("a young woman smiling\nan old man with a beard\n", encoding="utf-8")
    argv = args(models, folder, tmp / "prompts.txt")
    summary = curate.main(config(tmp, *argv))
    torch.set_num_threads(threads)
    return tmp, argv, summary


def stage_keys(out):
    """{stage: sorted keys over all parts}, asserting no key is written twice."""
    out_keys = {}
    for s in curate.MAP_STAGES:
        keys = [json.loads(line)["key"] for p in glob.glob(f"{out}/{s}/part-*.jsonl") for line in open(p)]
        assert len(keys) == len(set(keys)), f"{s}: duplicate records"
        out_keys[s] = sorted(keys)
    return out_keys


def test_counts_per_stage_and_reason(reference):
    tmp, _, summary = reference
    st = summary["stages"]
    assert st["scan"]["in"] == 12 and st["scan"]["kept"] == 8  # the hidden file is not listed
    assert st["scan"]["dropped"] == {"decompression bomb": 1, "not an image": 1, "too small": 1,
                                     "truncated or corrupt": 1}
    assert st["dedup"]["dropped"] == {"exact duplicate": 1, "near duplicate": 1} and st["dedup"]["kept"] == 6
    assert [st[s]["kept"] for s in ("detect", "vlm_filter", "recaption", "refine", "synth")] == [8, 6, 8, 2, 2]
    lines = read_manifest(str(tmp / "out"))
    assert len(lines) == 8 and summary["sources"] == {"raw": 6, "synthetic": 2}  # 3 : 1
    keys = {os.path.basename(r["path"]) for r in lines}
    assert {"a0.png", "a1.png"} <= keys and not {"a0_copy.png", "a1_small.jpg"} & keys  # the larger one stays
    assert all(r["caption_short"] == "woman smiling in park" for r in lines if r["source"] == "raw")
    assert lines[0]["attributes"]["gender"] == "female" and lines[0]["attributes"]["skin_tone"] == "light"
    split = {r["identity"]: r["split"] for r in lines}
    assert sorted(split.values()).count("test") == 2  # ceil(0.25 * 8 persons); each person in one split only
    assert os.path.getsize(tmp / "out" / "contact_sheet.png") > 0


@pytest.mark.parametrize("stage", curate.MAP_STAGES)
def test_resume_after_a_kill_in_each_stage(reference, stage, tmp_path, one_thread):
    """The state a kill leaves: the stage's part cut in the middle of a line, nothing after it. A rerun finishes
    with every record exactly once and the same manifest."""
    tmp, argv, _ = reference
    shutil.copytree(tmp / "out", tmp_path / "out")
    later = curate.MAP_STAGES[curate.MAP_STAGES.index(stage) + 1:]
    for s in later:
        shutil.rmtree(tmp_path / "out" / s)
    for f in ("manifest.jsonl", "identities.jsonl", "balance.jsonl", "summary.json"):
        os.remove(tmp_path / "out" / f)
    part = glob.glob(f"{tmp_path}/out/{stage}/part-*.jsonl")[0]
    data = open(part, "rb").read()
    cut = data.index(b"\n", len(data) // 3) + 20  # 20 bytes into a line after the first third
    open(part, "wb").write(data[:cut])
    done = len(cu.read_records(str(tmp_path / "out"), stage))
    assert 0 < done < len(data.splitlines())  # the cut line is ignored
    curate.main(config(tmp_path, *argv))
    assert stage_keys(tmp_path / "out") == stage_keys(tmp / "out")
    assert open(tmp_path / "out" / "manifest.jsonl").read() == open(tmp / "out" / "manifest.jsonl").read()


def test_two_shards_equal_one_run(reference, tmp_path, one_thread):
    tmp, argv, _ = reference
    for stage in curate.STAGES:  # shard 0 and shard 1 in turn, one stage at a time
        for i in (0, 1):
            curate.main(config(tmp_path, *argv, f"--stage={stage}", f"--shard={i}/2"))
    assert stage_keys(tmp_path / "out") == stage_keys(tmp / "out")
    assert open(tmp_path / "out" / "manifest.jsonl").read() == open(tmp / "out" / "manifest.jsonl").read()
    for part in glob.glob(f"{tmp_path}/out/*/part-*-of-002.jsonl"):  # each part holds its own shard's keys only
        i = int(os.path.basename(part).split("-")[1])
        assert all(cu.shard_of(json.loads(line)["key"], 2) == i for line in open(part))


def test_random_vlm_answers_are_parsed_counted_and_dropped(models, reference, tmp_path, one_thread):
    tmp, argv, _ = reference
    argv = [a for a in argv if not a.startswith(("--vlm_model", "--synth_prompts"))]
    cfg = config(tmp_path, *argv, f"--vlm_model={models['random']}")
    try:
        curate.main(cfg)
    except UserError as e:
        assert "no image passed every stage" in str(e)
    st = json.load(open(tmp_path / "out" / "summary.json"))["stages"]
    for stage, parse in (("vlm_filter", vp.analyst_fields), ("recaption", vp.caption_fields)):
        recs = cu.read_records(cfg.out_dir, stage).values()
        assert len(recs) == st[stage]["in"] == st[stage]["kept"] + sum(st[stage]["dropped"].values())
        for r in recs:  # the stored raw answer, parsed again, gives the same verdict
            assert vp.records([r], [r[f"{stage}_answer"]], parse, "a")[0].get("drop") == r.get("drop")
    assert st["recaption"]["in"] == st["vlm_filter"]["kept"] and st["vlm_filter"]["in"] == 6


def test_bad_input_is_one_line(models, tmp_path, one_thread):
    def fails(match, *argv):
        with pytest.raises(UserError, match=match) as e:
            curate.main(config(tmp_path, *argv))
        assert "\n" not in str(e.value)

    vlm = f"--vlm_model={models['vlm']}"
    (tmp_path / "empty").mkdir()
    fails("no files in these folders", f"--inputs={tmp_path / 'empty'}", vlm)
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.jpg").write_text("hello")
    fails(r"no usable image .*'not an image': 1", f"--inputs={tmp_path / 'texts'}", f"--out_dir={tmp_path}/o1", vlm)
    folder = make_folder(str(tmp_path / "raw"))
    (tmp_path / "latin1.txt").write_bytes("une femme souriante, \xe9t\xe9\n".encode("latin-1"))
    fails(r"latin1.txt line 1: byte 0xe9 is not UTF-8", f"--inputs={folder}",
          f"--synth_prompts={tmp_path}/latin1.txt",
          "--stage=scan")
    base = [f"--inputs={folder}", "--face_detector=none", "--max_new_tokens=8", f"--out_dir={tmp_path}/o2"]
    fails(r"--vlm_model='/no/such/folder' is not a model folder", *base, "--vlm_model=/no/such/folder")
    assert not os.path.exists(tmp_path / "o2")  # refused before any work
    fails("the model returned nothing for a whole batch of 6", *base, f"--vlm_model={models['mute']}",
          "--vlm_batch=8")


def test_stage_files_survive_a_cut_line(tmp_path):
    path = str(tmp_path / "s" / "part-000-of-001.jsonl")
    cu.append_records(path, [{"key": "a"}, {"key": "b"}])
    with open(path, "ab") as f:
        f.write(b'{"key": "c", "x"')  # the kill
    assert list(cu.read_records(str(tmp_path), "s")) == ["a", "b"]
    cu.append_records(path, [{"key": "c"}])
    assert open(path).read().splitlines() == ['{"key": "a"}', '{"key": "b"}', '{"key": "c"}']


def test_near_duplicates_match_brute_force():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2 ** 63, 40, dtype=np.int64)
    flips = [int(b) ^ sum(1 << int(j) for j in rng.choice(64, rng.integers(0, 9), replace=False)) for b in base]
    hashes = {f"k{i:03d}": {"phash": f"{h:016x}", "sha256": str(i), "width": 10, "height": 10}
              for i, h in enumerate(list(base) + flips)}
    drops = cu.dedup_drops(hashes, 4)
    kept = []
    for k in sorted(hashes):  # same order (equal sizes: by key)
        h = int(hashes[k]["phash"], 16)
        if all(bin(h ^ int(hashes[j]["phash"], 16)).count("1") > 4 for j in kept):
            kept.append(k)
    assert sorted(set(hashes) - set(drops)) == kept and 0 < len(drops) < 40
