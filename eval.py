"""
Evaluation on held-out identities (the "test" split; never seen in training). One function per --what:

  tokenizer   Table 2/4: MSE (0-255), SSIM, PSNR, face-box PSNR, identity similarity, the ceiling FaceSim / top-1
                python eval.py --what=tokenizer --ckpts=out/tokenizer/ckpt.pt,out/face_encoder/ckpt.pt
  generation  Table 1/3 on synthfaces: FaceSim, identity top-1, prompt adherence, s/image, with the null-face control
              and the real-image bounds:  python eval.py --what=generation --ckpt=out/hear/ckpt.pt
  gallery     reference crop | one sample per prompt, and the Fig. 8 strip:  python eval.py --what=gallery --out=g.png
  photos      Table 1 on real photos (CLIP-T, CLIP-I, DINO, FaceSim, no-face rate, s/image), --faces x --prompts:
                python eval.py --what=photos --ckpt=out/hear_2b/ckpt.pt --faces=data/eval_faces --prompts=prompts.txt
  per_scale   Fig. 8 as a number, FaceSim of the first k scales decoded:  python eval.py --what=per_scale --out=p.md
  strength    the trade-off vs id_scale and vs hf_from_scale (the adapter from scale k on):  --what=strength
  references  1, 2, 4 reference images per person, combined as mean / concat:  --what=references
  curves      train.py's metrics.jsonl -> loss and bit-accuracy PNG:  --what=curves --metrics=out/hear/metrics.jsonl

Tables are printed as markdown (and written to --out when set, with their numbers in <out stem>.json for study.py).
Generation is scored by the synthfaces judge's *evaluator* networks, never by the identity network the face encoder
was trained against (metrics.py).
"""

import dataclasses
import json
import math
import os
import time

import torch

from common import UserError, cli, log, run_info, setup_device
from data.curation import read_prompt_lines, write_atomic
from data.manifest import geometry, load_image, read_manifest
from metrics import evaluate_tokenizer, judge_scores, line_plot, per_scale_scores, summarize
from pipeline import (check_output, check_prompt, face_paths, generate, hf_scale_sides, load_run, load_tokenizer,
                      reference_crops)


@dataclasses.dataclass
class Config:
    preset: str = "synthfaces"  # preset name
    what: str = "tokenizer"  # tokenizer | generation | gallery | photos | per_scale | strength | references | curves
    data_dir: str = "data/synthfaces/out"  # manifest folder; the "test" split (held-out identities) is used
    judge: str = "weights/synthfaces/judge.pt"  # the synthfaces judge (the shipped one; "" = no identity column)
    device: str = "auto"  # auto | cpu | cuda
    out: str = ""  # optional output file: the markdown table (or the curves PNG)
    # tokenizer
    ckpts: str = "out/tokenizer/ckpt.pt,out/face_encoder/ckpt.pt"  # comma-separated tokenizer checkpoints
    names: str = ""  # optional comma-separated row names (default: the checkpoint paths)
    image_size: int = 64  # evaluation resolution (square)
    max_images: int = 400  # held-out images evaluated
    # generation
    ckpt: str = "out/hear/ckpt.pt"  # the train.py checkpoint
    prompts_per_identity: int = 4  # prompts (captions of other images) per held-out identity
    cfg: float = 3.0  # classifier-free guidance scale (the official Infinity default; docs/foundation.md on synthfaces)
    tau: float = 0.5  # logit temperature of the bit sampler (synthfaces; infinity_2b preset: 1)
    id_scale: float = 1.0  # lambda of Eq. (7)
    seed: int = 0  # sampling seed
    hf_from_scale: int = 0  # the high-frequency adapter acts from this scale on (0: every scale; K: never)
    # strength (also uses id_scale for its hf_from_scale curve)
    id_scales: tuple = (0.0, 0.25, 0.5, 1.0, 1.5, 2.0)  # the id_scale values of the trade-off curve
    reference_counts: tuple = (1, 2, 4)  # references: the numbers of reference images per identity compared
    # gallery
    gallery_ids: int = 4  # held-out identities (rows)
    gallery_prompts: tuple = ("photo of a smiling person in a red shirt with a blue hat, large face in the center, "
                              "even light, yellow background",
                              "pencil sketch of a surprised person in a white shirt with no accessories, medium face "
                              "on the left, lit from the right, teal background")  # one column each
    # photos (Table 1 on real photos; also uses ckpt, cfg, id_scale, seed)
    faces: str = "data/eval_faces"  # reference photos, one person each: a folder or comma-separated files
    prompts: str = "data/eval_prompts.txt"  # prompts, UTF-8, one per line (blank lines and # comments skipped)
    clip_model: str = "weights/clip-vit-large-patch14"  # local transformers CLIP folder (CLIP-T, CLIP-I)
    dino_model: str = "weights/dino-vits16"  # local transformers DINO v1 ViT-S/16 folder (DINO)
    face_detector: str = "auto"  # FaceSim and reference crops: auto (InsightFace pack if present, else dlib) | dlib
    face_model_pack: str = "antelopev2"  # InsightFace pack in ~/.insightface/models (antelopev2 or buffalo_l)
    # curves
    metrics: str = "out/hear/metrics.jsonl"  # train.py's metrics.jsonl


PRESETS = {"synthfaces": {}, "infinity_2b": {"tau": 1.0}}  # the sampler of the paper's scale


def write_table(table, cfg):
    """Print a markdown table and write it to --out (when set)."""
    log(table)
    if cfg.out:
        os.makedirs(os.path.dirname(os.path.abspath(cfg.out)), exist_ok=True)
        write_atomic(cfg.out, table + "\n")  # never a half-written table
    return table


COLUMNS = {"face_sim": "FaceSim", "top1": "identity top-1", "prompt_acc": "prompt adherence",
           "coarse_trait": "coarse traits", "fine_trait": "fine traits"}  # generation metrics: key -> column


def metric_table(first, rows):
    """{row label: {metric: value}} -> markdown lines: a column per COLUMNS key the rows have, in COLUMNS order."""
    keys = [k for k in COLUMNS if k in next(iter(rows.values()))]
    lines = [f"| {first} | " + " | ".join(COLUMNS[k] for k in keys) + " |", "|---" * (len(keys) + 1) + "|"]
    return lines + [f"| {label} | " + " | ".join(f"{m[k]:.4f}" for k in keys) + " |" for label, m in rows.items()]


def write_json(numbers, cfg):
    """The numbers of a table -> <out stem>.json (when --out is set), for study.py; written last and atomically, so
    its presence marks a finished evaluation."""
    if cfg.out:
        write_atomic(os.path.splitext(cfg.out)[0] + ".json", json.dumps(numbers, indent=1))
    return numbers


def load_judge_or_fail(cfg, device):
    from data.synthfaces.judge import load_judge

    if not os.path.isfile(cfg.judge):
        raise UserError(f"--judge={cfg.judge} not found; train it with python -m data.synthfaces.judge")
    return load_judge(cfg.judge, device)


# -----------------------------------------------------------------------------
# Tokenizers (Table 2 / 4)


def eval_tokenizers(cfg, device):
    """One row per tokenizer checkpoint on the held-out images."""
    records = read_manifest(cfg.data_dir, "test")[: cfg.max_images]
    paths = [p for p in cfg.ckpts.split(",") if p]
    names = cfg.names.split(",") if cfg.names else paths
    if len(names) != len(paths):
        raise UserError(f"--names has {len(names)} entries for {len(paths)} --ckpts")
    judge = load_judge_or_fail(cfg, device) if cfg.judge else None
    rows = ["| tokenizer | MSE (0-255) | SSIM | PSNR (dB) | face PSNR (dB) | ID sim | ceiling FaceSim | ceiling "
            "top-1 |", "|---|---|---|---|---|---|---|---|"]
    numbers = {}
    for name, path in zip(names, paths):
        vae = load_tokenizer(path)[0].to(device)
        m = numbers[name] = evaluate_tokenizer(vae, records, cfg.image_size, device, judge)
        judged = "- | - | -"  # ID sim (reconstruction vs original) and the ceiling's FaceSim and top-1 need the judge
        if judge:
            m["ceiling_face_sim"], m["ceiling_top1"] = tokenizer_ceiling(vae, judge, cfg, device)
            judged = " | ".join(f"{m[k]:.4f}" for k in ("id_sim", "ceiling_face_sim", "ceiling_top1"))
        rows.append(f"| {name} | {m['mse']:.2f} | {m['ssim']:.4f} | {m['psnr']:.2f} | {m['face_psnr']:.2f} | "
                    f"{judged} |")
    log(f"held-out identities: {len(records)} images of {cfg.data_dir}")
    table = write_table("\n".join(rows), cfg)
    write_json({"rows": numbers, "images": len(records), "ckpts": paths}, cfg)
    return table


# -----------------------------------------------------------------------------
# Training curves


def plot_curves(metrics_path, png_path, width=640, height=300):
    """train.py metrics.jsonl -> PNG with the loss (left) and the bit accuracy per scale group (right). PIL only."""
    rows = [json.loads(line) for line in open(metrics_path) if line.strip()]
    steps = [r["step"] for r in rows]
    acc = [("", steps, [r["acc"][g] for r in rows], colour) for g, colour in enumerate(("blue", "orange", "green"))]
    panels = [("loss", "step", [("", steps, [r["loss"] for r in rows], "black")]),
              ("bit accuracy: coarse / mid / fine", "step", acc)]
    return line_plot(panels, png_path, width, height)


# -----------------------------------------------------------------------------
# Generation on held-out identities (Table 1 / 3 style)


def held_out_identities(cfg, face_size, device):
    """-> (identity ids, {id: records}, reference crops (N, 3, S, S)): every test identity with a reference image
    (its image 0) and at least one other image whose caption is a prompt."""
    by_id = {}
    for r in read_manifest(cfg.data_dir, "test"):
        by_id.setdefault(r["identity"], []).append(r)
    ids = sorted(i for i in by_id if len(by_id[i]) > 1)
    refs = torch.stack([load_image(by_id[i][0]["crop_path"], (face_size, face_size)) for i in ids]).to(device)
    return ids, by_id, refs


@torch.no_grad()
def through_tokenizer(vae, images):
    """Images -> encode, multi-scale quantize, decode: the best any generator decoding through `vae` can do."""
    from tokenizer import small_schedule

    side = images.shape[-1] // vae.cfg.patch_size
    return vae.decode(vae.quantize(vae.encode(images), small_schedule(side, side))["z"])


@torch.no_grad()
def tokenizer_ceiling(vae, judge, cfg, device):
    """-> (FaceSim, top-1) of held-out real images through `vae`, scored exactly as eval_generation scores generated
    images: no generator decoding through this tokenizer can score above it."""
    ids, by_id, refs = held_out_identities(cfg, cfg.image_size, device)
    ref_embs, per_image = judge.embed(refs, "eval"), {}
    for n, i in enumerate(ids):
        recs = by_id[i][1: 1 + cfg.prompts_per_identity]
        real = torch.stack([load_image(r["path"], (cfg.image_size,) * 2) for r in recs]).to(device)
        own = torch.full((len(recs),), n, device=device)
        for k, v in judge_scores(judge, through_tokenizer(vae, real), ref_embs, own, [{}] * len(recs)).items():
            per_image.setdefault(k, []).append(v.cpu())
    m = summarize(per_image)
    return m["face_sim"], m["top1"]


@torch.no_grad()
def eval_generation(cfg, device):
    """Rows: HEAR with the face, the null face (prompt only), real images of the same identity (upper bound), the
    same real images through the tokenizer (the tokenizer's ceiling) and real images of another identity (chance)."""
    judge, run = load_judge_or_fail(cfg, device), load_run(cfg.ckpt, device)
    size = run.config["image_size"]
    ids, by_id, refs, ref_embs, traits = held_out_set(cfg, run, judge, device)  # one reference crop per identity
    rows, gen, seconds, n_img = {}, torch.Generator(device=device).manual_seed(cfg.seed), 0.0, 0
    paths = run.model.hear.cfg.use_global_face or run.model.hear.cfg.use_hf_adapter  # a base model has none
    first = "HEAR (face + prompt)" if paths else "base model (prompt only)"
    for n, i in enumerate(ids):
        recs = by_id[i][1: 1 + cfg.prompts_per_identity]  # prompts = captions of the identity's other images
        own, attrs = torch.full((len(recs),), n, device=device), [r["attributes"] for r in recs]
        prompts, crops = [r["caption_short"] for r in recs], refs[n: n + 1].expand(len(recs), -1, -1, -1)
        pool = by_id[ids[(n + 1) % len(ids)]]  # the next identity's images
        other = torch.stack([load_image(pool[k % len(pool)]["path"], (size, size)) for k in range(len(recs))])
        real = torch.stack([load_image(r["path"], (size, size)) for r in recs]).to(device)
        t = time.time()
        images = generate(run, prompts, crops, gen, cfg.cfg, cfg.tau, id_scale=cfg.id_scale,
                          hf_from_scale=cfg.hf_from_scale)[0]
        seconds, n_img = seconds + time.time() - t, n_img + len(recs)
        null = generate(run, prompts, crops, gen, cfg.cfg, cfg.tau, id_scale=cfg.id_scale, null_face=True)[0]
        for name, x in ((first, images), ("null face (prompt only)", null),
                        ("real image, same identity (upper bound)", real),
                        ("real image through the tokenizer (its ceiling)", through_tokenizer(run.vae, real)),
                        ("real image, other identity (chance)", other.to(device))):
            true = None if traits is None else [traits[n]] * len(recs)  # the reference person's traits
            for k, v in judge_scores(judge, x, ref_embs, own, attrs, true).items():
                rows.setdefault(name, {}).setdefault(k, []).append(v.cpu())
    means = {name: summarize(m) for name, m in rows.items()}
    table = metric_table("images", means)
    table.append(f"\n{len(ids)} held-out identities x {cfg.prompts_per_identity} prompts, cfg {cfg.cfg}, "
                 f"tau {cfg.tau}, top-1 chance {1 / len(ids):.3f}, {seconds / n_img:.3f} s per generated image "
                 "(decoder included)" + ("; coarse / fine traits: the share of the reference person's traits the "
                                         "judge's trait readers find on the face" if traits else ""))
    table = write_table("\n".join(table), cfg)
    write_json({"rows": means, "identities": len(ids), "prompts_per_identity": cfg.prompts_per_identity,
                "seconds_per_image": seconds / n_img, "ckpt": cfg.ckpt, "step": run.step}, cfg)
    return table


@torch.no_grad()
def eval_gallery(cfg, device):
    """Rows: the first gallery_ids held-out identities; columns: the reference crop, then one sample per prompt (all
    2x nearest-upscaled). Also <out stem>_scales.png: the running sum of the first k scales decoded, k = 1..K, for
    the first row and prompt (Fig. 8)."""
    import torchvision

    run = load_run(cfg.ckpt, device)
    _, _, refs = held_out_identities(cfg, run.config["face_size"], device)
    refs, n_prompts = refs[: cfg.gallery_ids], len(cfg.gallery_prompts)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    crops = refs.repeat_interleave(n_prompts, 0)  # (N * P, 3, S, S): each identity once per prompt
    images, per_scale = generate(run, list(cfg.gallery_prompts) * len(refs), crops, gen, cfg.cfg, cfg.tau,
                                 id_scale=cfg.id_scale)
    size = images.shape[-1]
    refs = torch.nn.functional.interpolate(refs, size=(size, size), mode="bilinear", antialias=True)
    grid = torch.cat([refs[:, None], images.view(len(refs), n_prompts, *images.shape[1:])], 1).flatten(0, 1)
    path = cfg.out or "gallery.png"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    up = torch.nn.functional.interpolate(grid.add(1).div(2).clamp(0, 1), scale_factor=2, mode="nearest")
    torchvision.utils.save_image(up, path, nrow=1 + n_prompts, padding=2, pad_value=1.0)
    strip = torch.cat([run.vae.decode(z[:1]) for z in per_scale]).add(1).div(2)
    strip_path = os.path.splitext(path)[0] + "_scales.png"
    torchvision.utils.save_image(torch.nn.functional.interpolate(strip, scale_factor=2, mode="nearest"), strip_path,
                                 nrow=len(per_scale), padding=2, pad_value=1.0)
    log(f"wrote {path} (rows: {len(refs)} held-out identities; columns: reference, then {n_prompts} prompts) and "
        f"{strip_path} (scales 1..{len(per_scale)} of row 1, prompt 1)")
    return path, strip_path


@torch.no_grad()
def eval_photos(cfg, device):
    """Table 1 on real photos: one image per (reference photo, prompt) pair at batch 1, seed + pair index, from the
    photo's detected, cropped face; scored against the whole photo (CLIP-I, DINO) and its face (FaceSim)."""
    import face_detect as fd
    import metrics as mt

    prompts = read_prompt_lines(cfg.prompts, "--prompts")
    if cfg.face_detector == "none":
        raise UserError("--face_detector=none: FaceSim needs a face backend (auto, insightface or dlib)")
    if not (cfg.cfg >= 0 and math.isfinite(cfg.id_scale)):
        raise UserError(f"--cfg={cfg.cfg} must be >= 0 and --id_scale={cfg.id_scale} finite")
    if cfg.out:
        check_output(cfg.out, image=False)
    paths = face_paths(cfg.faces)
    (clip, clip_tokenizer), dino = mt.load_clip(cfg.clip_model, device), mt.load_dino(cfg.dino_model, device)
    detector = fd.make_face_detector(cfg.face_detector, cfg.face_model_pack, device=device, log=log)
    run = load_run(cfg.ckpt, device)
    for n, p in enumerate(prompts):
        check_prompt(run, p, f"{cfg.prompts} prompt {n + 1}")
    crops, faces = reference_crops(paths, detector, run.config["face_size"], run.config.get("crop_scale", 1.4),
                                   hf_scale_sides(run))
    pairs = [(n, p) for n in range(len(paths)) for p in prompts]

    def image(k):
        gen = torch.Generator(device=device).manual_seed(cfg.seed + k)
        crop = crops[pairs[k][0]][None].to(device)
        return generate(run, [pairs[k][1]], crop, gen, cfg.cfg, cfg.tau, id_scale=cfg.id_scale)[0].cpu()

    image(0)  # warm-up, not timed
    t = time.time()
    images = torch.cat([image(k) for k in range(len(pairs))])  # (N M, 3, H, W)
    seconds = (time.time() - t) / len(pairs)
    refs = [load_image(paths[n]) for n, _ in pairs]
    face, found = mt.face_sim(detector, images, [faces[n]["embedding"] for n, _ in pairs])
    scores = [mt.clip_t(clip, clip_tokenizer, images, [p for _, p in pairs]), mt.clip_i(clip, images, refs),
              mt.dino_score(dino, images, refs), face]
    row = " | ".join(f"{float(s.mean()):.2f}" for s in scores)
    table = [f"| model | CLIP-T | CLIP-I | DINO | FaceSim ({detector.name}) | no face | s / image |", "|---" * 7 + "|",
             f"| {cfg.ckpt} (step {run.step}) | {row} | {1 - float(found.float().mean()):.1%} | {seconds:.3f} |",
             f"\n{len(paths)} reference photos x {len(prompts)} prompts, one image each (seed {cfg.seed} + pair "
             f"index, cfg {cfg.cfg}, id_scale {cfg.id_scale}). Cosines x100: CLIP {cfg.clip_model}, DINO "
             f"{cfg.dino_model}, FaceSim = {detector.name} identity embedding of the largest face, 0 without one "
             "(dlib and InsightFace FaceSim are not comparable). Speed: seconds per image at batch 1 after one "
             f"warm-up image on {device}: prompt encoding, face tokens, sampling, decoding (not detection, metrics)."]
    return write_table("\n".join(table), cfg)


# -----------------------------------------------------------------------------
# Identity per scale (Fig. 8 as a number) and identity strength (study.py)


def held_out_set(cfg, run, judge, device):
    """-> (identity ids, {id: records}, reference crops (N, 3, S, S), their evaluator embeddings (N, E), their true
    traits [N dicts] (traits.json of synthfaces), or None without traits.json or trait readers: no trait columns)."""
    from data.synthfaces.judge import read_traits

    ids, by_id, refs = held_out_identities(cfg, run.config["face_size"], device)
    traits = read_traits(cfg.data_dir) if judge.traits is not None else None
    return ids, by_id, refs, judge.embed(refs, "eval"), traits and [traits[i] for i in ids]


@torch.no_grad()
def score_setting(cfg, run, judge, held_out, per_scale=False, **knobs):
    """Every held-out identity x prompt (those of eval_generation) generated with one sampling setting (knobs:
    id_scale, hf_from_scale) and scored -> {metric: per-image values}, with per_scale also "per_scale" (K, images).
    The generator restarts from --seed for every setting: settings differ only by their knobs."""
    ids, by_id, refs, ref_embs, traits = held_out
    gen, out = torch.Generator(device=refs.device).manual_seed(cfg.seed), {}
    for n, i in enumerate(ids):
        recs = by_id[i][1: 1 + cfg.prompts_per_identity]
        own, crops = torch.full((len(recs),), n, device=refs.device), refs[n: n + 1].expand(len(recs), -1, -1, -1)
        true = None if traits is None else [traits[n]] * len(recs)
        images, sums = generate(run, [r["caption_short"] for r in recs], crops, gen, cfg.cfg, cfg.tau, **knobs)
        scores = judge_scores(judge, images, ref_embs, own, [r["attributes"] for r in recs], true)
        if per_scale:  # (K, B) each
            scores |= {f"per_scale_{k}": v for k, v in
                       per_scale_scores(judge, run.vae.decode, sums, ref_embs, own, true).items()}
        for k, v in scores.items():
            out.setdefault(k, []).append(v.cpu())
    return {k: torch.cat(v, dim=-1) for k, v in out.items()}


def eval_per_scale(cfg, device):
    """FaceSim of the running sum of the first k scales decoded, k = 1..K: the numbers behind the Fig. 8 strip."""
    judge, run = load_judge_or_fail(cfg, device), load_run(cfg.ckpt, device)
    s = score_setting(cfg, run, judge, held_out_set(cfg, run, judge, device), per_scale=True, id_scale=cfg.id_scale,
                      hf_from_scale=cfg.hf_from_scale)
    curves = {k: s[f"per_scale_{k}"].mean(1).tolist() for k in ("face_sim", "coarse_trait", "fine_trait")
              if f"per_scale_{k}" in s}  # {metric: [K values]}
    table = metric_table("scales decoded (k)", {k + 1: {m: v[k] for m, v in curves.items()}
                                                for k in range(len(curves["face_sim"]))})
    n = s["per_scale_face_sim"].shape[1]
    table.append(f"\n{cfg.ckpt} (step {run.step}), id_scale {cfg.id_scale}, hf_from_scale {cfg.hf_from_scale}, {n} "
                 "images; k = K is the final image")
    table = write_table("\n".join(table), cfg)
    write_json({"k": list(range(1, len(curves["face_sim"]) + 1)), **curves, "images": n, "ckpt": cfg.ckpt,
                "id_scale": cfg.id_scale, "hf_from_scale": cfg.hf_from_scale}, cfg)
    return table


def eval_strength(cfg, device):
    """The identity-strength trade-off: FaceSim, top-1, prompt adherence (and, with trait readers, coarse and fine
    trait accuracy) vs id_scale (the adapter on at every scale) and vs hf_from_scale = 0..K (the adapter on from
    scale k, at --id_scale)."""
    judge, run = load_judge_or_fail(cfg, device), load_run(cfg.ckpt, device)
    held_out = held_out_set(cfg, run, judge, device)
    K = len(geometry(run.config["pn"], run.config["image_size"], 1.0, run.vae.cfg.patch_size)[1])
    curves = {"id_scale": [(v, dict(id_scale=v)) for v in cfg.id_scales],
              "hf_from_scale": [(k, dict(id_scale=cfg.id_scale, hf_from_scale=k)) for k in range(K + 1)]}
    numbers, table = {"num_scales": K, "ckpt": cfg.ckpt, "id_scale": cfg.id_scale}, []
    for name, settings in curves.items():
        rows = {f"{v:g}": {k: float(x.mean()) for k, x in score_setting(cfg, run, judge, held_out, **knobs).items()
                           if k in COLUMNS} for v, knobs in settings}
        numbers[name] = {"values": [v for v, _ in settings]} | {k: [m[k] for m in rows.values()] for k in
                                                                 next(iter(rows.values()))}
        table += metric_table(name, rows) + [""]
    table.append(f"{cfg.ckpt} (step {run.step}): {len(held_out[0])} held-out identities x {cfg.prompts_per_identity} "
                 f"prompts per setting, cfg {cfg.cfg}; hf_from_scale k: the adapter acts from scale k on at "
                 f"id_scale {cfg.id_scale} (0: every scale, {K}: none)")
    table = write_table("\n".join(table), cfg)
    write_json(numbers, cfg)
    return table


@torch.no_grad()
def eval_references(cfg, device):
    """Several references per person (sample.py --face=a,b,c): rows k = --reference_counts crops of images 0..k-1 of
    each held-out identity, combined as mean and as concat. Every row uses the same prompts (captions of the next
    prompts_per_identity images, never a reference) and the same target: the mean evaluator embedding of those
    images' own crops, so no row is favoured by its reference being the target."""
    judge, run = load_judge_or_fail(cfg, device), load_run(cfg.ckpt, device)
    size, kmax, P = run.config["face_size"], max(cfg.reference_counts), cfg.prompts_per_identity
    ids, by_id, _ = held_out_identities(cfg, size, device)
    ids = [i for i in ids if len(by_id[i]) >= kmax + P]
    crops = {i: torch.stack([load_image(r["crop_path"], (size, size)) for r in by_id[i][: kmax + P]]).to(device)
             for i in ids}  # (kmax + P, 3, S, S) each
    targets = torch.stack([judge.embed(crops[i][kmax:], "eval").mean(0) for i in ids])
    targets = torch.nn.functional.normalize(targets, dim=1)  # (N, E)
    rows = [("null face (prompt only)", 1, "mean")] + [(f"{k} ref., {m}", k, m) for k in cfg.reference_counts
                                                       for m in ("mean", "concat") if k > 1 or m == "mean"]
    numbers = {}
    for name, k, mode in rows:
        gen, m = torch.Generator(device=device).manual_seed(cfg.seed), {}
        for n, i in enumerate(ids):
            recs = by_id[i][kmax: kmax + P]
            refs = crops[i][None, :k].expand(len(recs), -1, -1, -1, -1)  # (B, k, 3, S, S)
            images = generate(run, [r["caption_short"] for r in recs], refs, gen, cfg.cfg, cfg.tau,
                              id_scale=cfg.id_scale, face_combine=mode, null_face=name.startswith("null"))[0]
            own = torch.full((len(recs),), n, device=device)
            for key, v in judge_scores(judge, images, targets, own, [r["attributes"] for r in recs]).items():
                m.setdefault(key, []).append(v.cpu())
        numbers[name] = summarize(m)
    table = metric_table("references", numbers)
    table.append(f"\n{cfg.ckpt} (step {run.step}): {len(ids)} held-out identities x {P} prompts, cfg {cfg.cfg}, "
                 f"seed {cfg.seed} for every row; top-1 chance {1 / len(ids):.3f}")
    table = write_table("\n".join(table), cfg)
    write_json({"rows": numbers, "ckpt": cfg.ckpt, "identities": len(ids)}, cfg)
    return table


def main(cfg):
    if cfg.what == "curves":
        return log(f"wrote {plot_curves(cfg.metrics, cfg.out or 'curves.png')}")
    modes = {"tokenizer": eval_tokenizers, "generation": eval_generation, "gallery": eval_gallery,
             "photos": eval_photos, "per_scale": eval_per_scale, "strength": eval_strength,
             "references": eval_references}
    if cfg.what not in modes:
        raise UserError(f"--what={cfg.what!r}: choose {', '.join(modes)} or curves")
    device = setup_device(cfg.device).device
    log(run_info(device))
    return modes[cfg.what](cfg, device)


if __name__ == "__main__":
    cli(main, Config, PRESETS)
