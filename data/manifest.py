"""
The data every script shares: the manifest format and its reader, image and face-crop loading, aspect buckets,
deterministic batches, and the reference-face choice. train.py, train_tokenizer.py, sample.py, eval.py, curate.py
and the synthfaces judge all read data through this module.

The manifest format (the one definition; curate.py and data/*/prepare.py write it, read_manifest reads it)
-------------------------------------------------------------------------------------------------------------
One JSON object per line (JSONL). Paths are relative to the manifest's folder unless absolute.
  path           str    the training image
  face_box       [x0, y0, x1, y1]  face box in pixels of that image (detector output or known)
  caption_short  str    brief caption;  caption_long  str  detailed caption (training picks either, p = 0.5)
  crop_path      str    optional: aligned square face crop, the reference image (else cut from face_box)
  identity       str    optional: identity id (evaluation, reference sampling); records without one are their own
  split          str    optional: "train" (default) or "test" (held-out identities, evaluation only)
  caption_person str    optional: the person's looks in words; train.py --person_caption_prob appends it to a short
                        caption (the synthfaces base learns to draw a person from words; HEAR's captions leave it out)
  attributes     dict   optional: prompt-controlled attributes (synthfaces), used by eval.py
  source         str    optional: where the image came from (curate.py: a folder name, or "synthetic")
"""

import json
import os

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

import face_detect as fd
import tokenizer as tok
from common import UserError, seeded_generator

REQUIRED_FIELDS = ("path", "face_box", "caption_short", "caption_long")


def read_manifest(path, split=None):
    """Manifest file (or a folder holding manifest.jsonl) -> list of records, paths made absolute.
    split: keep only records of that split (records without one count as "train")."""
    if os.path.isdir(path):
        path = os.path.join(path, "manifest.jsonl")
    if not os.path.isfile(path):
        raise UserError(f"manifest {path} not found; run python -m data.synthfaces.prepare or curate.py first")
    root, records = os.path.dirname(os.path.abspath(path)), []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            missing = [k for k in REQUIRED_FIELDS if k not in rec]
            if missing:
                raise UserError(f"{path}:{n}: missing field(s) {missing} (see the manifest format in data/manifest.py)")
            for key in ("path", "crop_path"):
                if rec.get(key):
                    rec[key] = os.path.join(root, rec[key])
            if split is None or rec.get("split", "train") == split:
                records.append(rec)
    if not records:
        raise UserError(f"{path}: no records" + (f" with split={split!r}" if split else ""))
    return records


def caption(rec, short, person=False):
    """A record's training caption: short or long; `person` appends its caption_person to a short one."""
    if not short:
        return rec["caption_long"]
    if not person:
        return rec["caption_short"]
    if not rec.get("caption_person"):
        raise UserError(f"{rec['path']}: no caption_person in its manifest record; rerun python -m "
                        "data.synthfaces.prepare, or train with --person_caption_prob=0")
    return f"{rec['caption_short']}, {rec['caption_person']}"


# -----------------------------------------------------------------------------
# Images


def open_rgb(path, draft=None):
    """Image file -> upright 8-bit RGB PIL image, or a one-line UserError saying what is wrong with the file. Upright:
    the EXIF orientation of phone photos is applied. 16-bit grey scales 0..65535 to 0..255 (PIL's own convert clips
    it); transparency is composited on white, as a viewer shows it. PIL's decompression-bomb limit stays on: a header
    claiming more than 2 x Image.MAX_IMAGE_PIXELS pixels is refused before decoding. draft=(w, h): JPEG decodes at a
    reduced size directly (curate.py)."""
    if not os.path.exists(path):
        raise UserError(f"image {path} does not exist")
    if os.path.isdir(path):
        raise UserError(f"{path} is a folder, not an image file")
    try:
        with Image.open(path) as img:
            if draft:
                img.draft("RGB", draft)
            img = ImageOps.exif_transpose(img)  # decodes all the data: a truncated file fails here
    except UnidentifiedImageError:
        raise UserError(f"{path} is not an image file PIL can read (use a JPEG or PNG)") from None
    except Image.DecompressionBombError as e:
        raise UserError(f"{path}: {e} Refused; shrink the image (or raise PIL.Image.MAX_IMAGE_PIXELS if it is "
                        "trusted)") from None
    except Exception as e:  # OSError, SyntaxError, ValueError or zlib.error, depending on the format
        raise UserError(f"{path} is truncated or damaged ({str(e).splitlines()[0][:80]}); use an intact copy") from None
    if img.mode.startswith("I;16") or img.mode == "I":  # 16-bit grey (PNG): scale, do not clip
        img = Image.fromarray((np.asarray(img, np.float64) / 257).round().clip(0, 255).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
    return img.convert("RGB")


def image_size(path):
    """(width, height) of an image as open_rgb shows it (upright: EXIF orientations 5-8 swap the sides); header
    only."""
    with Image.open(path) as img:
        w, h = img.size
        return (h, w) if img.getexif().get(0x0112, 1) in (5, 6, 7, 8) else (w, h)


def load_image(path, size=None):
    """Image file -> (3, H, W) float in [-1, 1] (RGB, upright: open_rgb); size=(H, W) resizes (bicubic). One-line
    error if unreadable."""
    img = open_rgb(path)
    if size is not None and img.size != (size[1], size[0]):
        img = img.resize((size[1], size[0]), Image.BICUBIC)
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 127.5 - 1


def load_example(rec, size):
    """One record -> (image (3, H, W), face box (4,) scaled to the resized image). size = (H, W)."""
    if not os.path.isfile(rec["path"]):
        raise UserError(f"image {rec['path']} listed in the manifest does not exist")
    w0, h0 = image_size(rec["path"])  # header only
    sx, sy = size[1] / w0, size[0] / h0
    box = torch.tensor(rec["face_box"], dtype=torch.float32) * torch.tensor([sx, sy, sx, sy])
    return load_image(rec["path"], size), box


def load_face_crop(rec, size, crop_scale):
    """The reference face of a record, (3, size, size) in [-1, 1]: its crop_path image, else a square crop of side
    crop_scale * max(box w, h) cut from the record's own image at its own resolution (face_box is in its pixels), so
    a reference is never cut from an image stretched to another aspect bucket."""
    if rec.get("crop_path"):
        return load_image(rec["crop_path"], (size, size))
    box = torch.tensor([rec["face_box"]], dtype=torch.float32)  # (1, 4) in the image's own pixels
    return fd.square_crop(load_image(rec["path"])[None], box, crop_scale, size)[0]


# -----------------------------------------------------------------------------
# Reference faces, batches and aspect buckets


def identity_pools(records):
    """{identity: [record indices]}; a record without an identity is a pool of its own."""
    pools = {}
    for i, rec in enumerate(records):
        pools.setdefault(rec.get("identity", f"#{i}"), []).append(i)
    return pools


def pick_references(records, pools, indices, u, self_prob=0.0):
    """One reference record per target, from u (B,) uniform in [0, 1): the target itself with probability self_prob,
    else a random image of the target's identity (the target included, 1/n). Another image of the person keeps the
    model from copying the target's expression or accessories through the face tokens (identity from the reference,
    the scene from the prompt); the target itself is the easiest signal to learn identity transfer from."""
    refs = []
    for i, ui in zip(indices, u.tolist()):
        pool = pools[records[i].get("identity", f"#{i}")]
        refs.append(i if ui < self_prob else pool[int((ui - self_prob) / (1 - self_prob) * len(pool))])
    return refs


def epoch_batches(n, global_batch, epoch, seed, buckets=None):
    """Deterministic batches of one epoch: shuffle within each aspect bucket, cut into full global batches, shuffle
    the batches. The data position of a run is just its step, so resume needs no sampler state."""
    g = seeded_generator(seed, epoch)
    buckets = buckets if buckets is not None else [list(range(n))]
    batches = []
    for idx in buckets:
        perm = [idx[i] for i in torch.randperm(len(idx), generator=g).tolist()]
        batches += [perm[i: i + global_batch] for i in range(0, len(perm) - global_batch + 1, global_batch)]
    if not batches:
        raise UserError(f"fewer examples ({n}) than one global batch ({global_batch}); lower --batch_size")
    return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]


def aspect_buckets(records, pn):
    """Group records by the official aspect template nearest to their image's h/w -> {template: [indices]}.
    pn == "" puts everything in one square bucket (synthfaces)."""
    if not pn:
        return {1.0: list(range(len(records)))}
    buckets = {}
    for i, rec in enumerate(records):
        w, h = image_size(rec["path"])  # reads the header only
        buckets.setdefault(tok.nearest_template(h / w), []).append(i)
    return buckets


def geometry(pn, image_size, template, patch_size):
    """(pixel size (H, W), scale schedule, RoPE grid) of an aspect bucket: the official template schedule for a pixel
    budget pn, or (pn == "") the small square schedule of image_size."""
    if pn:
        schedule = tok.get_schedule(template, pn)
        return (schedule[-1][0] * patch_size, schedule[-1][1] * patch_size), schedule, tok.rope_grid(template)
    side = image_size // patch_size
    schedule = tok.small_schedule(side, side)
    return (image_size, image_size), schedule, schedule[-1]
