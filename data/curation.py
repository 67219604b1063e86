"""
The data side of curate.py (the identity data pipeline of HEAR, Fig. 3): durable stage files, image checks and
hashes, the duplicate choice, skin tone (ITA), identity grouping, balanced sampling order and the contact sheet.
Plain functions of their inputs; the stage order, sharding and models live in curate.py.
"""

import base64
import glob
import hashlib
import json
import math
import os
import random
from collections import Counter, defaultdict

import numpy as np
import torch
from PIL import Image, ImageDraw, UnidentifiedImageError

from common import UserError
from data.manifest import image_size, open_rgb
from data import vlm_prompts as vp

# -----------------------------------------------------------------------------
# Stage files: append-only JSONL parts, one per shard


def read_records(out_dir, stage):
    """Every part of a stage -> {key: record}. A last line without its newline is an append cut short by a kill:
    it is ignored, so that item counts as not done."""
    out = {}
    for path in sorted(glob.glob(os.path.join(out_dir, stage, "part-*.jsonl"))):
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.endswith("\n"):
                    break
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    raise UserError(f"{path}:{n}: not valid JSON (a damaged stage file; delete it to redo)") from None
                out.setdefault(rec["key"], rec)
    return out


def append_records(path, records):
    """One write of whole lines, then fsync. A partial last line left by an earlier kill is cut off first."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "ab+") as f:
        f.seek(0, os.SEEK_END)
        if f.tell():
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.seek(0)
                f.truncate(f.read().rfind(b"\n") + 1)
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode())
        f.flush()
        os.fsync(f.fileno())


def write_atomic(path, text):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def save_atomic(image, path):
    """PIL image -> PNG at path, written to a temporary name first (a kill never leaves half an image)."""
    image.save(f"{path}.tmp{os.getpid()}", format="PNG")
    os.replace(f"{path}.tmp{os.getpid()}", path)


def shard_of(key, n):
    return int(hashlib.md5(key.encode()).hexdigest()[:8], 16) % n


def read_jsonl(path, stage):
    if not os.path.isfile(path):
        raise UserError(f"{path} is missing: run --stage={stage} first")
    with open(path, encoding="utf-8") as f:
        return {r["key"]: r for r in map(json.loads, f)}


def parse_shard(text):
    """--shard: "i/n", or "auto" = torchrun's RANK/WORLD_SIZE (0/1 without torchrun) -> (i, n)."""
    if text == "auto":
        text = f"{os.environ.get('RANK', 0)}/{os.environ.get('WORLD_SIZE', 1)}"
    try:
        i, n = (int(x) for x in text.split("/"))
        assert 0 <= i < n
    except (ValueError, AssertionError):
        raise UserError(f"--shard={text}: expected i/n with 0 <= i < n") from None
    return i, n


def list_files(inputs):
    """--inputs (comma-separated folders) -> {key: {key, path, source}} for every file under them (hidden ones
    skipped); key = <folder name>/<path relative to the folder>, source = the folder name."""
    folders = [os.path.abspath(os.path.expanduser(p.strip())) for p in inputs.split(",") if p.strip()]
    names = [os.path.basename(f) for f in folders]
    if not folders or len(set(names)) != len(names):
        raise UserError(f"--inputs={inputs!r}: give comma-separated folders with distinct names")
    out = {}
    for folder, name in zip(folders, names):
        if not os.path.isdir(folder):
            raise UserError(f"--inputs: {folder} is not a folder")
        for root, dirs, files in os.walk(folder):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for f in sorted(f for f in files if not f.startswith(".")):
                key = f"{name}/{os.path.relpath(os.path.join(root, f), folder).replace(os.sep, '/')}"
                out[key] = {"key": key, "path": os.path.join(root, f), "source": name}
    if not out:
        raise UserError(f"--inputs={inputs}: no files in these folders")
    return out


def read_prompt_lines(path, flag):
    """A prompt file (UTF-8, one prompt per line; blank lines and # comments skipped) -> [prompts]; a missing,
    unreadable, non-UTF-8 or empty file is a one-line error naming the command-line flag it came from."""
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
    except UnicodeDecodeError as e:
        line = e.object[: e.start].count(b"\n") + 1
        raise UserError(f"{flag}={path} line {line}: byte {e.object[e.start]:#x} is not UTF-8; save the file as "
                        "UTF-8") from None
    except OSError as e:
        raise UserError(f"{flag}={path}: cannot read it ({e.strerror}); give a UTF-8 text file, one prompt per line") \
            from None
    lines = [s.strip() for s in text.splitlines() if s.strip() and not s.strip().startswith("#")]
    if not lines:
        raise UserError(f"{flag}={path} holds no prompt (one per line)")
    return lines


def read_prompts(path, count, seed, prefix):
    """Prompt file (read_prompt_lines) -> {<prefix>/<j>.png: {key, prompt, index}} for j < count (0 = one per line);
    image j uses line order[j % lines] of a seeded random order (the paper draws 50k prompts at random)."""
    lines = read_prompt_lines(path, "--synth_prompts")
    order = random.Random(seed).sample(range(len(lines)), len(lines))
    keys = [f"{prefix}/{j:06d}.png" for j in range(count or len(lines))]
    return {k: {"key": k, "prompt": lines[order[j % len(lines)]], "index": j} for j, k in enumerate(keys)}


def summarize(out_dir, stages, inp, rec, drops):
    """Counts per stage (in, kept, dropped per reason, not yet done) and the CPU and wall seconds per item of each
    stage, over all shards and runs (the time-*.jsonl lines of run_map)."""
    out = {}
    for s in stages:
        done = [k for k in inp[s] if k in rec[s]]
        reasons = Counter(rec[s][k]["drop"] for k in done if "drop" in rec[s][k])
        reasons.update(drops[k] for k in done if s == "dedup" and k in drops)
        times = [json.loads(line) for p in glob.glob(os.path.join(out_dir, s, "time-*.jsonl")) for line in open(p)]
        n = max(1, sum(t["items"] for t in times))
        out[s] = {"in": len(inp[s]), "kept": len(done) - sum(reasons.values()), "not_done": len(inp[s]) - len(done),
                  "dropped": dict(sorted(reasons.items())), "cpu_s_per_item": sum(t["cpu_s"] for t in times) / n,
                  "wall_s_per_item": sum(t["wall_s"] for t in times) / n}
    return out


def summary_table(stages):
    """summarize() -> printable lines, a stage per line."""
    return [f"{s:>10}: {c['in']:>7} in {c['kept']:>7} kept  {c['cpu_s_per_item']:.4f} s/item cpu  "
            f"{c['wall_s_per_item']:.4f} wall  {c['dropped'] or ''}" for s, c in stages.items()]


# -----------------------------------------------------------------------------
# Images: checks, loading, hashes, duplicates, skin tone


def check_image(item, min_side, max_pixels):
    """-> {key, width, height} (upright, as open_rgb shows it), or {key, drop: reason} for a file that is no usable
    image."""
    return {"key": item["key"], **_check_image(item["path"], min_side, max_pixels)}


def _check_image(path, min_side, max_pixels):
    try:
        img = Image.open(path)
    except UnidentifiedImageError:
        return {"drop": "not an image"}
    except Image.DecompressionBombError:
        return {"drop": "decompression bomb"}
    except OSError:
        return {"drop": "unreadable"}
    with img:
        w, h = img.size
        if w * h > max_pixels:
            return {"drop": "decompression bomb"}
        if min(w, h) < min_side:
            return {"drop": "too small"}
    try:
        w, h = open_rgb(path).size  # decodes all the data: a truncated or damaged file fails here
    except UserError:
        return {"drop": "truncated or corrupt"}
    return {"width": w, "height": h}


def load_rgb(path, max_side=0):
    """-> (upright RGB image (open_rgb) shrunk so its longer side is <= max_side when max_side > 0, scale factor
    applied), or (None, 0) for a file that cannot be read any more (the caller drops it)."""
    try:
        img = open_rgb(path, (max_side, max_side) if max_side else None)  # JPEG: decoded at a reduced size directly
        w = image_size(path)[0]  # the upright width before any reduction
    except (OSError, UserError):
        return None, 0.0
    s = min(1.0, max_side / max(img.size)) if max_side else 1.0
    if s < 1:
        img = img.resize((max(1, round(img.width * s)), max(1, round(img.height * s))), Image.BICUBIC)
    return img, img.width / w


def hash_image(item):
    import imagehash

    try:
        with open(item["path"], "rb") as f:
            data = f.read()
    except OSError:
        return {"key": item["key"], "drop": "unreadable"}
    img = load_rgb(item["path"], 512)[0]  # pHash works on a 32x32 DCT, so 512 px loses nothing
    if img is None:
        return {"key": item["key"], "drop": "unreadable"}
    return {"key": item["key"], "sha256": hashlib.sha256(data).hexdigest(), "phash": str(imagehash.phash(img))}


def dedup_drops(hashes, max_dist):
    """{key: "exact duplicate" | "near duplicate"} over all hashed images: the largest image of a group (then the
    first key) stays. Near: pigeonhole on max_dist + 1 bands of the 64-bit pHash, so only band matches are compared."""
    order = sorted(hashes, key=lambda k: (-hashes[k]["width"] * hashes[k]["height"], k))
    nb = min(max_dist + 1, 64)
    width = math.ceil(64 / nb)
    seen, bands, drops = {}, defaultdict(list), {}
    for k in order:
        ph = int(hashes[k]["phash"], 16)
        if hashes[k]["sha256"] in seen:
            drops[k] = "exact duplicate"
            continue
        seen[hashes[k]["sha256"]] = k
        keys = [(b, (ph >> (b * width)) & ((1 << width) - 1)) for b in range(nb)]
        if any(bin(ph ^ other).count("1") <= max_dist for key in keys for other in bands[key]):
            drops[k] = "near duplicate"
            continue
        for key in keys:
            bands[key].append(ph)
    return drops


def face_fields(face, img, s, width, height):
    """A backend's face found in img (the photo shrunk by s) -> the detect record fields in full-size pixels: box
    (clipped to the photo), landmarks, score, the identity embedding as base64 float16, skin ITA."""
    box = np.clip(np.asarray(face["box"], np.float64) / s, 0, [width, height, width, height])
    kps = face.get("kps")
    emb = face.get("embedding")
    return {"box": np.round(box, 1).tolist(), "score": round(float(face["score"]), 4),
            "kps": None if kps is None else np.round(np.asarray(kps, np.float64) / s, 1).tolist(),
            "embedding": None if emb is None else base64.b64encode(np.asarray(emb, np.float16).tobytes()).decode(),
            "skin_ita": skin_ita(img, face["box"])}


def skin_ita(img, box):
    """Individual typology angle (degrees) of the cheeks-and-nose part of the face box: atan((L* - 50) / b*)
    [Chardon et al. 1991]. Del Bino's six classes, merged in pairs: > 41 light, 10..41 medium, < 10 dark."""
    from skimage.color import rgb2lab

    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    patch = np.asarray(img.crop((round(x0 + 0.3 * w), round(y0 + 0.45 * h), round(x1 - 0.3 * w), round(y1 - 0.2 * h))))
    if patch.size == 0:
        return None
    L, _, b = rgb2lab(patch).reshape(-1, 3).mean(0)
    return round(math.degrees(math.atan2(L - 50, b)), 1)


def skin_tone(ita):
    return None if ita is None else "light" if ita > 41 else "medium" if ita > 10 else "dark"


def attributes(rec):
    """Fig. 5 attributes of a record from its captions; skin tone from the measured ITA when the captions do not
    say it."""
    attrs = vp.caption_attributes(rec["caption_short"], rec["caption_long"])
    if attrs["skin_tone"] == "unknown":
        attrs["skin_tone"] = skin_tone(rec.get("skin_ita")) or "unknown"
    return attrs


# -----------------------------------------------------------------------------
# Identities and balance


def group_identities(final, threshold, device):
    """Union-find over image pairs whose embeddings have cosine >= threshold -> {key: person id}. Images without
    an embedding are persons of their own. A person id is a hash of its first key (stable across reruns)."""
    keys = sorted(final)
    have = [k for k in keys if final[k].get("embedding")]
    parent = list(range(len(have)))

    def root(a):
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    if have:
        emb = np.stack([np.frombuffer(base64.b64decode(final[k]["embedding"]), np.float16) for k in have])
        emb = torch.nn.functional.normalize(torch.from_numpy(emb.astype(np.float32)).to(device), dim=1)  # (N, E)
        for s in range(0, len(have), 2048):  # (2048, N) similarities at a time
            rows, cols = torch.nonzero(emb[s: s + 2048] @ emb.T >= threshold, as_tuple=True)
            for a, b in zip((rows + s).tolist(), cols.tolist()):
                ra, rb = root(a), root(b)
                parent[max(ra, rb)] = min(ra, rb)
    groups = defaultdict(list)
    for j, k in enumerate(have):
        groups[root(j)].append(k)
    groups = list(groups.values()) + [[k] for k in keys if not final[k].get("embedding")]
    return {k: "p" + hashlib.md5(g[0].encode()).hexdigest()[:10] for g in groups for k in g}


def dealt(keys, group, seed):
    """Keys in water-filling order: shuffle each attribute group, then take one of every group in turn, so any
    prefix is as even over the groups as the groups allow."""
    by, rng = defaultdict(list), random.Random(seed)
    for k in sorted(keys):
        by[group[k]].append(k)
    for g in sorted(by):
        rng.shuffle(by[g])
    rounds = max((len(v) for v in by.values()), default=0)
    return [by[g][r] for r in range(rounds) for g in sorted(by) if r < len(by[g])]


# -----------------------------------------------------------------------------
# Contact sheet


def contact_sheet(path, stages, inp, rec, drops, kept, n=6, side=96, label=260):
    """One PNG: a row of kept images, then a row per (stage, drop reason) with up to n examples each; files that
    cannot be shown (not an image, truncated, ...) are grey tiles."""
    paths = {k: v.get("path", "") for s in ("scan", "detect") for k, v in inp[s].items()}
    rows = [(f"kept ({len(kept)})", [paths[k] for k in kept[:n]])]
    for s in stages:
        by = defaultdict(list)
        for k in sorted(inp[s]):
            reason = drops.get(k) if s == "dedup" else rec[s].get(k, {}).get("drop")
            if reason:
                by[reason].append(paths.get(k, ""))
        rows += [(f"{s}: {r} ({len(v)})", v[:n]) for r, v in sorted(by.items())]
    sheet = Image.new("RGB", (label + n * side, len(rows) * side), "white")
    draw = ImageDraw.Draw(sheet)
    for y, (text, files) in enumerate(rows):
        draw.text((4, y * side + side // 2 - 6), text, fill="black")
        for x, f in enumerate(files):
            tile = load_rgb(f, side)[0] if f else None
            if tile is None:  # whatever made the file a drop
                tile = Image.new("RGB", (side, side), "grey")
            sheet.paste(tile, (label + x * side, y * side))
    sheet.save(path)
