"""
Identity data curation (HEAR section 3.1, Fig. 3, Appendix C): raw photo folders -> the manifest train.py reads.

Stages (Fig. 3), each runnable alone with --stage=<name>, all of them in this order by default:
  scan        list the files under --inputs; non-image, unreadable, truncated, too small and decompression-bomb
              files are dropped with their reason
  dedup       exact (SHA-256 of the bytes) and near duplicates (64-bit pHash within --phash_distance bits); the
              largest image of each group stays
  detect      InsightFace (buffalo_l, when the pack is present) or dlib: keep images with one reliably detected face
              (--det_thresh, --min_face_frac, --multi_face); store box, landmarks, score, identity embedding
  vlm_filter  the "Facial Recognition Analyst" prompt on a VLM (Qwen2.5-VL-32B in the paper): drop faces it finds
              non-compliant (profile, occluded, blurred, badly lit) and answers that do not parse
  recaption   the "Image Caption Creator" prompt: a short and a long caption per image
  synth       the "Textual Prompt Refiner" prompt on a text model (Qwen2.5-32B) enriches --synth_prompts, a diffusers
              pipeline (SD3.5-large / FLUX.1-dev) draws them; the images then go through detect and recaption
  identities  images whose embeddings have cosine >= --identity_threshold are one person; --test_fraction of the
              persons are held out as split "test", so no person is in both splits
  balance     attribute-balanced sampling (gender, skin tone, ...; Fig. 5) at --natural_per_synthetic (3:1)
  export      manifest.jsonl (format: data/manifest.py), summary.json (counts per stage and drop reason, time per
              image), contact_sheet.png (kept and dropped examples per reason)

  python curate.py --inputs=/data/celeba,/data/laion --vlm_model=/models/Qwen2.5-VL-32B-Instruct --out_dir=out/faces

Files: out_dir/<stage>/part-<i>-of-<n>.jsonl, a record per item and its key (<folder name>/<relative path>, or
synthetic/<n>.png; a drop carries its reason). Each batch is one append + fsync, and a stage skips the keys of any
part, so a run killed anywhere and restarted ends with no duplicate and no lost item (a line cut by the kill is
ignored). --shard=i/n (torchrun: one per GPU): a process does the keys with md5(key) % n == i; shards meet only
through these files (detect waits for every shard's dedup, shard 0 for all before identities). README: Data curation.
"""

import dataclasses
import hashlib
import importlib.util
import json
import math
import os
import time
from typing import Optional
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import face_detect
from common import UserError, cli, log, resolve_device, save_config
from data import curation as cu
from data import vlm_prompts as vp


@dataclasses.dataclass
class Config:
    inputs: str = ""  # comma-separated folders of raw photos; a folder's name is the `source` of its images
    out_dir: str = "out/curate"  # stage files, synth/ images, manifest.jsonl, summary.json, contact_sheet.png
    stage: str = "all"  # all (in order) | scan | dedup | detect | vlm_filter | recaption | synth | identities | ...
    shard: str = "auto"  # i/n: this process does items with md5(key) % n == i; auto = torchrun RANK/WORLD_SIZE or 0/1
    device: str = "auto"  # auto | cpu | cuda (under torchrun: cuda:LOCAL_RANK)
    workers: int = 8  # threads that read and decode images
    wait_s: float = 86400.0  # with n > 1 shards: how long to wait for the other shards at a global step
    seed: int = 0  # synthetic prompt choice, generation seeds, balance and split draws
    # scan, dedup
    min_side: int = 128  # drop images whose shorter side is below this (pixels)
    max_pixels: int = 89_478_485  # larger images are decompression bombs (PIL's own default limit)
    phash_distance: int = 4  # near duplicates: 64-bit pHash Hamming distance <= this
    # detect
    face_detector: str = "auto"  # auto (insightface when its pack is present, else dlib) | insightface | dlib | none
    face_pack: str = "buffalo_l"  # InsightFace model pack (folder name under <face_root>/models, or a path)
    face_root: str = "~/.insightface"  # InsightFace root folder
    det_thresh: Optional[float] = None  # detection score threshold; None = the backend's (InsightFace 0.5, dlib 0)
    det_max_side: int = 1024  # images are shrunk to this longer side for detection (boxes are mapped back)
    min_face_frac: float = 0.1  # faces with sqrt(box area) < this x the shorter image side are ignored (too small)
    multi_face: str = "drop"  # several faces that count: drop the image, or keep the largest
    # vision-language model (vlm_filter, recaption; also the refiner when refiner_model is empty)
    vlm_model: str = "models/Qwen2.5-VL-32B-Instruct"  # local transformers folder of the VLM (the paper's)
    vlm_batch: int = 8  # images per generate() call
    vlm_max_side: int = 1024  # images are shrunk to this longer side before the VLM's own processor
    max_new_tokens: int = 256  # answer length limit
    # synth
    synth_prompts: str = ""  # UTF-8 text file, one identity prompt per line ("" = no synthetic images)
    synth_count: int = 0  # images to generate (0 = one per prompt line); prompts are drawn in a seeded order
    refiner_model: str = ""  # local folder of the text model (Qwen/Qwen2.5-32B-Instruct); "" = use vlm_model
    synth_model: str = ""  # local diffusers folder (SD3.5-large, FLUX.1-dev); the class comes from model_index.json
    synth_batch: int = 4  # images per pipeline call
    synth_size: int = 1024  # generated image side (pixels)
    synth_steps: int = 28  # denoising steps
    synth_guidance: float = 3.5  # classifier-free guidance scale
    # identities, balance, export
    identity_threshold: float = 0.0  # same person iff embedding cosine >= this; 0 = the detector's usual value
    test_fraction: float = 0.05  # share of persons held out as split "test"
    natural_per_synthetic: float = 3.0  # natural : synthetic images in the export (paper: 3:1)
    balance_attributes: str = "gender,skin_tone"  # caption attributes whose combinations are sampled evenly
    max_images: int = 0  # export at most this many images (0 = all natural ones + their share of synthetic)
    sheet_examples: int = 6  # contact sheet: examples per row (kept, and each drop reason)


PRESETS = {"default": {}}
STAGES = ("scan", "dedup", "detect", "vlm_filter", "recaption", "synth", "identities", "balance", "export")
MAP_STAGES = ("scan", "dedup", "detect", "vlm_filter", "recaption", "refine", "synth")  # per-item stage files
SAME_PERSON = {"insightface": 0.4, "dlib": 0.9}  # cosine; dlib's d < 0.6 on raw descriptors ~ 0.9 (face_detect)
SYNTH = "synthetic"


def is_synthetic(key):
    return key.startswith(SYNTH + "/")


@dataclasses.dataclass
class Run:
    shard: tuple  # (i, n)
    device: str
    pool: ThreadPoolExecutor
    listing: dict = None  # the files under --inputs
    model: tuple = None  # ((kind, path), loaded model): one model in memory at a time
    face: object = None  # the face detector backend
    answered: set = dataclasses.field(default_factory=set)  # stages whose model has given a non-empty answer


# -----------------------------------------------------------------------------
# The stage loop and the plan: what each stage must process, from the stage files as they are now


def run_map(cfg, run, stage, items, only=None):
    """Run the stage's work(list of items) -> records on this shard's items (only(key) ones) the stage has not done
    yet, a batch at a time, appending each batch durably. items: {key: merged upstream record}."""
    i, n = run.shard
    done = cu.read_records(cfg.out_dir, stage)
    todo = [k for k in sorted(items) if cu.shard_of(k, n) == i and k not in done and (only is None or only(k))]
    if not todo:
        return
    path = os.path.join(cfg.out_dir, stage, f"part-{i:03d}-of-{n:03d}.jsonl")
    work = WORK[stage](cfg, run, stage)  # loads the stage's model: not part of the time per item
    batch = {"scan": 64, "dedup": 64, "detect": 16, "synth": cfg.synth_batch}.get(stage, cfg.vlm_batch)
    cpu, wall = time.process_time(), time.time()
    with tqdm(total=len(todo), desc=f"{stage} [{i}/{n}]", unit="img", mininterval=2) as bar:
        for s in range(0, len(todo), batch):
            cu.append_records(path, work([items[k] for k in todo[s: s + batch]]))
            bar.update(len(todo[s: s + batch]))
    timing = {"items": len(todo), "cpu_s": time.process_time() - cpu, "wall_s": time.time() - wall}
    cu.append_records(os.path.join(cfg.out_dir, stage, f"time-{i:03d}-of-{n:03d}.jsonl"), [timing])
    log(f"{stage} [{i}/{n}]: {len(todo)} items, {timing['wall_s'] / len(todo):.3f} s/item wall", cfg.out_dir)


def plan(cfg, run):
    """(inputs, final, records, dedup drops): inputs[stage] = {key: merged upstream record} the map stage must
    process; final = {key: everything known} of the images that passed recaption."""
    rec = {s: cu.read_records(cfg.out_dir, s) for s in MAP_STAGES}

    def ok(stage, items):
        return {k: {**items[k], **rec[stage][k]} for k in items if k in rec[stage] and "drop" not in rec[stage][k]}

    run.listing = run.listing or cu.list_files(cfg.inputs)  # listed once per process
    prompts = cu.read_prompts(cfg.synth_prompts, cfg.synth_count, cfg.seed, SYNTH) if cfg.synth_prompts else {}
    inp = {"scan": run.listing, "refine": prompts}
    inp["dedup"] = scan = ok("scan", inp["scan"])
    hashed = ok("dedup", scan)
    drops = cu.dedup_drops(hashed, cfg.phash_distance)
    inp["synth"] = ok("refine", inp["refine"])
    out_dir = os.path.abspath(cfg.out_dir)  # synthetic paths are stored relative to it (a movable folder)
    synth = {k: {**v, "path": os.path.join(out_dir, v["path"])} for k, v in ok("synth", inp["synth"]).items()}
    inp["detect"] = {**{k: v for k, v in hashed.items() if k not in drops}, **synth}
    det = ok("detect", inp["detect"])
    inp["vlm_filter"] = {k: v for k, v in det.items() if not is_synthetic(k)}
    vlm = ok("vlm_filter", inp["vlm_filter"])
    inp["recaption"] = {k: v for k, v in det.items() if k in vlm or is_synthetic(k)}
    return inp, ok("recaption", inp["recaption"]), rec, drops


def require(cfg, run, stages, everyone):
    """Block until these stages have a record for every input: of all shards (everyone) or of this one (then a
    gap is an error at once: this process is the one to fill it). Returns the plan."""
    i, n = run.shard
    start = time.time()
    while True:
        inp, _, rec, _ = p = plan(cfg, run)
        left = {s: sum(k not in rec[s] and (everyone or cu.shard_of(k, n) == i) for k in inp[s]) for s in stages}
        left = {s: c for s, c in left.items() if c}
        if not left:
            return p
        what = ", ".join(f"{s} has {c} items to do" for s, c in left.items())
        if not everyone or n == 1:
            raise UserError(f"{what} (shard {i}/{n}): run --stage={next(iter(left)).replace('refine', 'synth')} first")
        if time.time() - start > cfg.wait_s:
            raise UserError(f"waited {cfg.wait_s:.0f}s for the other shards: {what}; are all {n} shards running?")
        time.sleep(min(10.0, cfg.wait_s))


# -----------------------------------------------------------------------------
# Per-item work: scan, dedup, detect


def file_work(cfg, run, stage):
    """scan (is the file a usable image?) or dedup (its hashes), one thread per file."""
    def one(item):
        return cu.hash_image(item) if stage == "dedup" else cu.check_image(item, cfg.min_side, cfg.max_pixels)

    return lambda items: list(run.pool.map(one, items))


def detect_work(cfg, run, stage):
    """Batch of items -> detect records: the face kept, or why none is (score and size rules, several faces)."""
    if run.face is None and cfg.face_detector != "none":
        run.face = face_detect.make_face_detector(kind=cfg.face_detector, pack=cfg.face_pack, root=cfg.face_root,
                                                  det_thresh=cfg.det_thresh, device=run.device, log=print)
    whole = {"kps": None, "score": 1.0, "embedding": None}  # --face_detector=none: the image is the face

    def one(item, img, s):
        if img is None:  # removed or changed since scan: skipped and counted, like a drop at scan
            return {"key": item["key"], "drop": "unreadable"}
        W, H = item["width"], item["height"]
        faces = run.face(np.asarray(img)) if run.face else [{"box": [0, 0, img.width, img.height], **whole}]
        for f in faces:
            f["area"] = (f["box"][2] - f["box"][0]) * (f["box"][3] - f["box"][1])
        big = [f for f in faces if f["area"] ** 0.5 / s >= cfg.min_face_frac * min(W, H)]  # the others do not count
        rec = {"key": item["key"], "faces": len(big), "detector": getattr(run.face, "name", "none")}
        if not big:
            return {**rec, "drop": "face too small" if faces else "no face"}
        if len(big) > 1 and cfg.multi_face == "drop":
            return {**rec, "drop": "several faces"}
        return {**rec, **cu.face_fields(max(big, key=lambda f: f["area"]), img, s, W, H)}

    def work(items):
        loaded = run.pool.map(lambda it: cu.load_rgb(it["path"], cfg.det_max_side), items)
        return [one(it, img, s) for it, (img, s) in zip(items, loaded)]

    return work


# -----------------------------------------------------------------------------
# Models: VLM / text model (transformers), diffusion pipeline (diffusers); local folders only


def model_folder(cfg, kind):
    """kind: vlm | refiner | synth -> (kind, folder); a one-line error when the folder holds no model."""
    if kind == "refiner" and not cfg.refiner_model:
        kind = "vlm"  # a VLM also answers text-only prompts
    key = {"vlm": "vlm_model", "refiner": "refiner_model", "synth": "synth_model"}[kind]
    path, marker = os.path.expanduser(getattr(cfg, key)), "model_index.json" if kind == "synth" else "config.json"
    if not os.path.isfile(os.path.join(path, marker)):
        raise UserError(f"--{key}={path!r} is not a model folder (no {marker}); models are read from local folders "
                        "only (see the README: Data curation)")
    return kind, path


def load_model(cfg, run, kind):
    """kind: vlm | refiner | synth -> (model, processor) or a pipeline. One model is in memory at a time."""
    kind, path = model_folder(cfg, kind)
    if run.model and run.model[0] == (kind, path):
        return run.model[1]
    run.model = None  # free the previous model first
    torch.cuda.empty_cache()  # a no-op when CUDA was never used
    dtype = torch.bfloat16 if run.device.startswith("cuda") else torch.float32
    if kind == "synth":
        from diffusers import DiffusionPipeline

        obj = DiffusionPipeline.from_pretrained(path, local_files_only=True, torch_dtype=dtype).to(run.device)
        obj.set_progress_bar_config(disable=True)
    else:
        import transformers as tf

        proc = (tf.AutoProcessor if kind == "vlm" else tf.AutoTokenizer).from_pretrained(path, local_files_only=True)
        auto = tf.AutoModelForImageTextToText if kind == "vlm" else tf.AutoModelForCausalLM
        gpu = run.device.startswith("cuda") and importlib.util.find_spec("accelerate")  # loads straight to the GPU
        placed = {"device_map": run.device} if gpu else {}  # (else a 32B model passes through host memory)
        obj = (auto.from_pretrained(path, local_files_only=True, dtype=dtype, **placed).to(run.device).eval(), proc)
        getattr(proc, "tokenizer", proc).padding_side = "left"  # new tokens are appended on the right
    run.model = ((kind, path), obj)
    return obj


def ask(cfg, run, stage, kind, system, users, images=None):
    """vp.chat on the stage's model. A model whose first batch in a stage is all empty answers returns nothing:
    a one-line error rather than a run that drops every image."""
    model, proc = load_model(cfg, run, kind)
    try:
        answers = vp.chat(model, proc, system, users, images, cfg.max_new_tokens)
    except ValueError as e:  # e.g. a tokenizer without a chat template
        raise UserError(f"{stage}: the model cannot take the prompt ({str(e).splitlines()[0][:120]})") from None
    if any(answers):
        run.answered.add(stage)
    elif stage not in run.answered:
        raise UserError(f"{stage}: the model returned nothing for a whole batch of {len(answers)}; is it an "
                        "instruction-tuned chat model (e.g. Qwen2.5-VL-*-Instruct)?")
    return answers


def chat_work(cfg, run, stage):
    """vlm_filter (Facial Recognition Analyst) and recaption (Image Caption Creator) on images, refine (Textual
    Prompt Refiner) on the text of identity prompts, in the paper's input form `Input Prompt: "..."`."""
    system, user, parse = vp.STAGE_PROMPTS[stage]
    load_model(cfg, run, "refiner" if stage == "refine" else "vlm")

    def work(items):
        if stage == "refine":
            users, images = [f'{user}\n\nInput Prompt: "{it["prompt"]}"' for it in items], None
        else:
            users = [user] * len(items)
            images = [img for img, _ in run.pool.map(lambda it: cu.load_rgb(it["path"], cfg.vlm_max_side), items)]
        answers = ask(cfg, run, stage, "refiner" if stage == "refine" else "vlm", system, users, images)
        return vp.records(items, answers, parse, f"{stage}_answer")

    return work


def synth_work(cfg, run, stage):
    """Refined prompts -> images (one seed per image index, so a redone image is the same) in out_dir/synth_images."""
    folder = os.path.join(os.path.abspath(cfg.out_dir), "synth_images")
    os.makedirs(folder, exist_ok=True)
    pipe = load_model(cfg, run, "synth")

    def work(items):
        gens = [torch.Generator().manual_seed(cfg.seed * 1_000_003 + it["index"]) for it in items]
        images = pipe(prompt=[it["refined"] for it in items], height=cfg.synth_size, width=cfg.synth_size,
                      num_inference_steps=cfg.synth_steps, guidance_scale=cfg.synth_guidance, generator=gens).images
        out = []
        for it, img in zip(items, images):
            path = os.path.join(folder, os.path.basename(it["key"]))
            cu.save_atomic(img, path)
            out.append({"key": it["key"], "path": os.path.relpath(path, os.path.dirname(folder)), "source": SYNTH,
                        "width": img.width, "height": img.height})
        return out

    return work


WORK = {"scan": file_work, "dedup": file_work, "detect": detect_work, "vlm_filter": chat_work, "recaption": chat_work,
        "refine": chat_work, "synth": synth_work}  # stage -> (cfg, run, stage) -> work(items) -> records


# -----------------------------------------------------------------------------
# Global steps: identities, balance, export (shard 0, once every shard is done)


def stage_identities(cfg, run):
    final = require(cfg, run, MAP_STAGES, everyone=True)[1]
    names = sorted({final[k]["detector"] for k in final if final[k].get("embedding")})
    if len(names) > 1:
        raise UserError(f"the detect records come from several detectors {names}; redo detect in a new --out_dir")
    threshold = cfg.identity_threshold or SAME_PERSON.get(names[0] if names else "", 0.5)
    person = cu.group_identities(final, threshold, run.device)
    persons = sorted(set(person.values()), key=lambda p: hashlib.md5(f"{cfg.seed}/{p}".encode()).hexdigest())
    n_test = min(math.ceil(cfg.test_fraction * len(persons)), len(persons) - 1)  # >= 1 train person
    test = set(persons[:max(n_test, 0)])
    recs = [{"key": k, "identity": p, "split": "test" if p in test else "train"} for k, p in sorted(person.items())]
    cu.write_atomic(os.path.join(cfg.out_dir, "identities.jsonl"), "".join(json.dumps(r) + "\n" for r in recs))
    log(f"identities: {len(persons)} persons, {len(test)} held out, {len(recs)} images, cos>={threshold}", cfg.out_dir)


def stage_balance(cfg, run):
    final = require(cfg, run, MAP_STAGES, everyone=True)[1]
    ids = cu.read_jsonl(os.path.join(cfg.out_dir, "identities.jsonl"), "identities")
    names = [a.strip() for a in cfg.balance_attributes.split(",") if a.strip()]
    if set(names) - set(vp.ATTRIBUTE_WORDS):
        raise UserError(f"--balance_attributes={cfg.balance_attributes}: choose from {sorted(vp.ATTRIBUTE_WORDS)}")
    attrs = {k: cu.attributes(final[k]) for k in ids if k in final}
    group = {k: tuple(a[n] for n in names) for k, a in attrs.items()}
    natural = cu.dealt([k for k in attrs if not is_synthetic(k)], group, cfg.seed)
    synthetic = cu.dealt([k for k in attrs if is_synthetic(k)], group, cfg.seed + 1)
    r = cfg.natural_per_synthetic
    n_nat = min(len(natural), round(cfg.max_images * r / (r + 1))) if cfg.max_images else len(natural)
    n_syn = min(len(synthetic), round(n_nat / r) if r > 0 else len(synthetic))
    chosen = natural[:n_nat] + synthetic[:n_syn]
    lines = [json.dumps({"key": k, "attributes": attrs[k]}) + "\n" for k in sorted(chosen)]
    cu.write_atomic(os.path.join(cfg.out_dir, "balance.jsonl"), "".join(lines))
    log(f"balance: {n_nat} of {len(natural)} natural + {n_syn} of {len(synthetic)} synthetic images "
        f"(asked {r}:1), even over {'/'.join(names)}", cfg.out_dir)


def stage_export(cfg, run):
    inp, final, rec, drops = require(cfg, run, MAP_STAGES, everyone=True)
    ids = cu.read_jsonl(os.path.join(cfg.out_dir, "identities.jsonl"), "identities")
    chosen = cu.read_jsonl(os.path.join(cfg.out_dir, "balance.jsonl"), "balance")
    if set(chosen) - set(final) or set(chosen) - set(ids):
        raise UserError("balance.jsonl or identities.jsonl is older than the stage files: rerun those stages")
    out_dir, lines = os.path.abspath(cfg.out_dir), []
    for k in sorted(chosen):
        r = final[k]
        path = os.path.relpath(r["path"], out_dir) if r["path"].startswith(out_dir + os.sep) else r["path"]
        lines.append({"path": path, "face_box": r["box"], "caption_short": r["caption_short"],
                      "caption_long": r["caption_long"], "identity": ids[k]["identity"], "split": ids[k]["split"],
                      "attributes": chosen[k]["attributes"], "source": r["source"]})
    cu.write_atomic(os.path.join(cfg.out_dir, "manifest.jsonl"), "".join(json.dumps(x) + "\n" for x in lines))
    summary = {"stages": cu.summarize(cfg.out_dir, MAP_STAGES, inp, rec, drops), "exported": len(lines),
               "persons": len({x["identity"] for x in lines}), "splits": Counter(x["split"] for x in lines),
               "sources": Counter(x["source"] for x in lines)}
    cu.write_atomic(os.path.join(cfg.out_dir, "summary.json"), json.dumps(summary, indent=1) + "\n")
    cu.contact_sheet(os.path.join(cfg.out_dir, "contact_sheet.png"), MAP_STAGES, inp, rec, drops, sorted(chosen),
                     cfg.sheet_examples)
    for line in cu.summary_table(summary["stages"]):
        log(line, cfg.out_dir)
    log(f"export: {len(lines)} images of {summary['persons']} persons -> {cfg.out_dir}/manifest.jsonl", cfg.out_dir)
    if not lines:
        raise UserError(f"no image passed every stage; the counts per stage are in {cfg.out_dir}/summary.json")
    return summary


# -----------------------------------------------------------------------------
# Stages in order


NEEDS = {"scan": ((), False), "dedup": (("scan",), False), "detect": (("scan", "dedup"), True),
         "vlm_filter": (("detect",), False), "recaption": (("detect", "vlm_filter"), False)}  # (stages, every shard)


def stage_map(cfg, run, stage):
    """scan, dedup, detect, vlm_filter, recaption: once the stages they read are done, do this shard's share."""
    inp, _, rec, _ = require(cfg, run, *NEEDS[stage])
    if stage == "detect" and not inp["dedup"]:
        reasons = Counter(r.get("drop") for r in rec["scan"].values())
        raise UserError(f"no usable image under --inputs={cfg.inputs} ({len(inp['scan'])} files: {dict(reasons)})")
    run_map(cfg, run, stage, inp[stage])


def stage_synth(cfg, run):
    """Refine the prompts, draw them, then detect and recaption the new images (this shard's, in this order)."""
    if not cfg.synth_prompts:
        return log("synth: no --synth_prompts, so no synthetic images", cfg.out_dir)
    for stage in ("refine", "synth", "detect", "recaption"):
        run_map(cfg, run, stage, plan(cfg, run)[0][stage], is_synthetic)


def main(cfg):
    if cfg.stage not in STAGES + ("all",):
        raise UserError(f"--stage={cfg.stage}: choose all or one of {', '.join(STAGES)}")
    if cfg.multi_face not in ("drop", "largest"):
        raise UserError(f"--multi_face={cfg.multi_face}: choose drop or largest")
    (i, n), stages = cu.parse_shard(cfg.shard), STAGES if cfg.stage == "all" else (cfg.stage,)
    synth = "synth" in stages and bool(cfg.synth_prompts)
    for kind in ["vlm"] * bool({"vlm_filter", "recaption"} & set(stages) or synth) + ["refiner", "synth"] * synth:
        model_folder(cfg, kind)  # a missing model is an error now, not hours into the run
    device = resolve_device(cfg.device)
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        device = f"cuda:{os.environ['LOCAL_RANK']}"  # torchrun: one shard per GPU, no process group needed
    os.makedirs(cfg.out_dir, exist_ok=True)
    save_config(cfg, cfg.out_dir, f"config-{i}-of-{n}.json")
    Image.MAX_IMAGE_PIXELS = cfg.max_pixels  # PIL's own bomb check agrees with ours
    run, summary = Run((i, n), device, ThreadPoolExecutor(cfg.workers)), None
    runners = {"synth": stage_synth, "identities": stage_identities, "balance": stage_balance, "export": stage_export}
    with run.pool:
        for stage in stages:
            if stage in ("identities", "balance", "export") and i != 0:
                log(f"{stage}: done by shard 0", cfg.out_dir)
                continue
            summary = runners[stage](cfg, run) if stage in runners else stage_map(cfg, run, stage)
    return summary


if __name__ == "__main__":
    cli(main, Config, PRESETS)
