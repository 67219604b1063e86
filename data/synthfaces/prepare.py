"""
synthfaces: the embedded procedural identity dataset of the HEAR quick start (design.md section 5).

An *identity* is a seed that fixes face shape, skin tone, eyes (shape, size, spacing, iris colour), brows, nose,
mouth, ears, hair style and colour, facial hair, and a fine mole/freckle pattern that is 1-2 px at 64x64, so only the
finest token scales can carry it. Every *image* of an identity varies only what a prompt controls (captions.ATTRIBUTES).
Each image gets a short and a long caption of those attributes (never of the identity: that must come from the
reference face, as in HEAR), a phrase of the identity's looks that only the base model's training appends
(`caption_person`: the base learns to draw a person from words, as a web-trained model has), the exact face box, and
an aligned square face crop (the `--face` reference image).
Train and test identities are disjoint; test identities are for zero-shot evaluation only.

Run from the repo root, as a module (numpy + PIL for the pixels, `tokenizers` for the vocabulary; no download; every
output byte is a function of the config, whatever the number of workers):
  python -m data.synthfaces.prepare                           # 300 train ids x 16 + 50 test ids x 8 images, 64x64
  python -m data.synthfaces.prepare --preset=tiny --out_dir=/tmp/synthfaces_tiny
  python -m data.synthfaces.prepare --resolution=128 --crop_size=128 --out_dir=data/synthfaces/out128

Outputs in out_dir: images/<id>_<k>.png, crops/<id>_<k>.png, manifest.jsonl (one image per line), tokenizer.json
(word-level, T5 special tokens <pad>=0 </s>=1 <unk>=2, appends </s>), traits.json (every identity's traits as class
labels, for the judge's trait readers), meta.json, contact_sheet.png (rows = identities, cols = contexts; also copied
to assets/). The manifest follows data/manifest.py (read it with read_manifest); the
attribute vocabulary, the captions and the tokenizer are defined in data/synthfaces/captions.py, how an identity and
an image are drawn in data/synthfaces/draw.py.
"""

import json
import multiprocessing
import os
import shutil
import time
from dataclasses import dataclass

import numpy as np
from PIL import Image

from common import UserError, cli, config_dict, log
from data.synthfaces.captions import ATTRIBUTES, build_caption, build_tokenizer, person_phrase
from data.synthfaces.draw import COARSE_TRAITS, FINE_TRAITS, TRAITS, identity_rng, render, sample_attributes, \
    sample_identity, trait_labels


@dataclass
class Config:
    out_dir: str = "data/synthfaces/out"  # output folder (images/, crops/, manifest.jsonl, tokenizer.json, meta.json)
    seed: int = 1337  # every output byte is a function of this seed and the sizes below
    train_ids: int = 300  # number of train identities
    test_ids: int = 50  # number of held-out test identities (disjoint from train; evaluation only)
    train_images: int = 16  # images per train identity
    test_images: int = 8  # images per test identity
    resolution: int = 64  # image side in pixels
    crop_size: int = 64  # side of the aligned square face crop (64 = the tokenizer resolution of the quick start)
    crop_scale: float = 1.4  # crop side = crop_scale * max(face box w, h), centred on it (face_detect.square_box)
    supersample: int = 4  # draw at resolution * supersample, then box-filter down (anti-aliasing)
    sheet_ids: int = 8  # contact sheet rows: identities (first half train, second half test)
    sheet_contexts: int = 8  # contact sheet columns: fixed contexts, the same for every row (plus the reference crop)
    sheet_copy: str = "assets/synthfaces_contact_sheet.png"  # copy of the contact sheet ('' = no copy)
    workers: int = 0  # render processes (0 = all usable cores, 1 = no pool); outputs do not depend on it


PRESETS = {
    "synthfaces": {},  # the defaults: the CPU quick start
    "tiny": dict(train_ids=12, test_ids=4, train_images=8, test_images=4, sheet_ids=4, sheet_contexts=4,
                 sheet_copy="", workers=1, out_dir="out/synthfaces_tiny"),
}

# -----------------------------------------------------------------------------
# Dataset files


def _render_identity(job):
    """Worker: render, write and describe every image of one identity. job = (split, ordinal, name, n, cfg dict)."""
    split, ordinal, name, n, c = job
    rng = identity_rng(c["seed"], split, ordinal)
    traits = sample_identity(rng)
    labels = trait_labels(traits)
    records = []
    for k in range(n):
        attrs = sample_attributes(rng)
        jitter = tuple(rng.uniform(-0.02, 0.02, 3))
        image, crop, face_box = render(traits, attrs, c["resolution"], c["crop_size"], c["crop_scale"],
                                       c["supersample"], jitter, rng)
        path, crop_path = f"images/{name}_{k:02d}.png", f"crops/{name}_{k:02d}.png"
        image.save(os.path.join(c["out_dir"], path), format="PNG")
        crop.save(os.path.join(c["out_dir"], crop_path), format="PNG")
        records.append(dict(path=path, crop_path=crop_path, identity=name, split=split, attributes=attrs,
                            caption_short=build_caption(attrs), caption_long=build_caption(attrs, long=True),
                            caption_person=person_phrase(labels), face_box=face_box))
    return records, labels


def contact_sheet(cfg, rows):
    """Rows = identities [(split, ordinal)], cols = the reference crop, then cfg.sheet_contexts fixed contexts."""
    rng = np.random.default_rng([cfg.seed, 2])
    contexts = []
    for k in range(cfg.sheet_contexts):
        attrs = sample_attributes(rng)
        attrs["style"] = ATTRIBUTES["style"][k % 3]  # show every style
        contexts.append(attrs)
    res, gap = cfg.resolution, 2
    sheet = Image.new("RGB", ((cfg.sheet_contexts + 1) * (res + gap) + gap, len(rows) * (res + gap) + gap), "white")
    for i, (split, ordinal) in enumerate(rows):
        traits = sample_identity(identity_rng(cfg.seed, split, ordinal))
        for j, attrs in enumerate(contexts):  # no sensor noise (rng=None): it would triple the PNG size
            image, crop, _ = render(traits, attrs, res, cfg.crop_size, cfg.crop_scale, cfg.supersample)
            if j == 0:
                sheet.paste(crop.resize((res, res), Image.BOX), (gap, gap + i * (res + gap)))
            sheet.paste(image, (gap + (j + 1) * (res + gap), gap + i * (res + gap)))
    return sheet


def main(cfg):
    t0 = time.time()
    if min(cfg.train_ids, cfg.test_ids, cfg.train_images, cfg.test_images) < 1:
        raise UserError("train_ids, test_ids, train_images and test_images must all be >= 1")
    if cfg.resolution < 32 or cfg.crop_size < 16 or cfg.supersample < 1 or cfg.crop_scale < 1.0:
        raise UserError("need resolution >= 32, crop_size >= 16, supersample >= 1 and crop_scale >= 1")
    print(json.dumps(config_dict(cfg), indent=1))
    for sub in ("images", "crops"):
        os.makedirs(os.path.join(cfg.out_dir, sub), exist_ok=True)

    c = config_dict(cfg)
    jobs = [("train", i, f"id{i:04d}", cfg.train_images, c) for i in range(cfg.train_ids)]
    jobs += [("test", j, f"id{cfg.train_ids + j:04d}", cfg.test_images, c) for j in range(cfg.test_ids)]
    workers = cfg.workers or len(os.sched_getaffinity(0))
    if workers > 1:
        with multiprocessing.Pool(workers) as pool:  # imap keeps job order, so the manifest order is fixed
            per_id = list(pool.imap(_render_identity, jobs, chunksize=4))
    else:
        per_id = [_render_identity(job) for job in jobs]
    records = [r for rs, _ in per_id for r in rs]
    with open(os.path.join(cfg.out_dir, "manifest.jsonl"), "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    log(f"rendered {len(records)} images of {len(jobs)} identities in {time.time() - t0:.1f}s ({workers} workers)")

    traits = dict(coarse=COARSE_TRAITS, fine=FINE_TRAITS, values=TRAITS,
                  identities={job[2]: labels for job, (_, labels) in zip(jobs, per_id)})
    with open(os.path.join(cfg.out_dir, "traits.json"), "w") as f:
        f.write(json.dumps(traits, indent=1) + "\n")

    tok = build_tokenizer()
    tok.save(os.path.join(cfg.out_dir, "tokenizer.json"))
    lengths = {k: max(len(tok.encode(r[f"caption_{k}"]).ids) for r in records) for k in ("short", "long")}

    half = cfg.sheet_ids // 2
    rows = [("train", i) for i in range(min(cfg.sheet_ids - half, cfg.train_ids))]
    rows += [("test", j) for j in range(min(half, cfg.test_ids))]
    sheet_path = os.path.join(cfg.out_dir, "contact_sheet.png")
    sheet = contact_sheet(cfg, rows)
    # a 256-colour palette with Floyd-Steinberg dithering keeps the file small (about 110 KB at the default size)
    palette = sheet.quantize(256, method=Image.Quantize.MEDIANCUT)
    sheet = sheet.quantize(palette=palette, dither=Image.Dither.FLOYDSTEINBERG)
    sheet.save(sheet_path, format="PNG", optimize=True)
    if cfg.sheet_copy:
        os.makedirs(os.path.dirname(os.path.abspath(cfg.sheet_copy)), exist_ok=True)
        shutil.copyfile(sheet_path, cfg.sheet_copy)

    # meta.json holds only what determines the bytes (no paths, no timings), so equal seeds give equal files
    recorded = {k: v for k, v in c.items() if k not in ("out_dir", "workers", "sheet_copy")}
    meta = dict(name="synthfaces", seed=cfg.seed, resolution=cfg.resolution, crop_size=cfg.crop_size,
                crop_scale=cfg.crop_scale,
                counts=dict(train_ids=cfg.train_ids, test_ids=cfg.test_ids,
                            train_images=cfg.train_ids * cfg.train_images, test_images=cfg.test_ids * cfg.test_images),
                attributes=ATTRIBUTES, vocab_size=tok.get_vocab_size(), max_caption_tokens=lengths, config=recorded)
    with open(os.path.join(cfg.out_dir, "meta.json.tmp"), "w") as f:  # written last and atomically: the data is
        f.write(json.dumps(meta, indent=1) + "\n")  # complete when meta.json exists (quickstart.py relies on it)
    os.replace(os.path.join(cfg.out_dir, "meta.json.tmp"), os.path.join(cfg.out_dir, "meta.json"))
    log(f"wrote {cfg.out_dir}: {len(records)} images + crops, manifest.jsonl, tokenizer.json "
        f"(vocab {tok.get_vocab_size()}, max tokens {lengths}), meta.json, contact_sheet.png "
        f"({os.path.getsize(sheet_path) / 1024:.0f} KB) in {time.time() - t0:.1f}s")
    return meta


if __name__ == "__main__":
    cli(main, Config, PRESETS)

# -----------------------------------------------------------------------------
# Expected output, default config (seed 1337), `python -m data.synthfaces.prepare` on 2 CPU cores (AMD EPYC):
#   rendered 5200 images of 350 identities in 10.6s (2 workers); 12.9 s wall with imports (22 s with --workers=1;
#   the same bytes either way)
#   train: 300 identities x 16 images = 4800; test: 50 identities x 8 images = 400 (identities id0300-id0349)
#   images/ 20 MB and crops/ 23 MB of PNG (apparent size), manifest.jsonl 5.1 MB, contact_sheet.png 106 KB
#   tokenizer.json: vocab 139 (3 special tokens + 136 words, 41 of them for the person's looks); longest caption in
#   tokens with </s>: short 29, long 72, a short one with the looks 64
#   face box height 24.3-39.7 px (mean 32.0), width 18.0-38.3 px (mean 27.4) at 64x64
#   attribute values are close to uniform, e.g. style photo 1752 / flat 1741 / sketch 1707
#   sha256 prefixes: manifest.jsonl a246ab43bbeae8ff, tokenizer.json 2fbb1c3c9ef94b62, meta.json 9b0cd00b65f95a64
#   (PNG bytes also depend on the zlib/Pillow build: images/id0000_00.png d86dd9501546914b with Pillow 13.0.0)
