"""
Evaluation on held-out identities (the "test" split; never seen in training).

  tokenizers (paper Table 2/4: MSE on the 0-255 scale, SSIM, PSNR, PSNR inside the face box, identity similarity):
    python eval.py --ckpts=out/tokenizer/ckpt.pt,out/face_encoder/ckpt.pt
  generation (Table 1/3 style, synthfaces): FaceSim, identity retrieval, prompt adherence, seconds per image:
    python eval.py --what=generation --ckpt=out/hear/ckpt.pt

Both print a markdown table (and write it to --out when set). Generation is scored by the synthfaces judge's
*evaluator* networks, never by the identity network the face encoder was trained against.
"""

import dataclasses
import os

import torch

from common import cli, log, run_info, setup_device


@dataclasses.dataclass
class Config:
    preset: str = "synthfaces"  # preset name
    what: str = "tokenizer"  # tokenizer | generation
    ckpt: str = "out/hear/ckpt.pt"  # generation: the train.py checkpoint
    prompts_per_identity: int = 4  # generation: prompts (captions of other images) per held-out identity
    guidance: float = 3.0  # generation: CFG scale
    id_scale: float = 1.0  # generation: lambda of Eq. (7)
    seed: int = 0  # generation: sampling seed
    ckpts: str = "out/tokenizer/ckpt.pt,out/face_encoder/ckpt.pt"  # comma-separated tokenizer checkpoints
    names: str = ""  # optional comma-separated row names (default: the checkpoint paths)
    data_dir: str = "data/synthfaces/out"  # manifest folder; the "test" split (held-out identities) is used
    image_size: int = 64  # evaluation resolution (square)
    max_images: int = 400  # held-out images evaluated
    device: str = "auto"  # auto | cpu | cuda
    out: str = ""  # optional markdown file for the table
    curves: str = ""  # instead: train.py metrics.jsonl -> loss and bit-accuracy curves PNG written to --out
    judge: str = "data/synthfaces/out/judge.pt"  # synthfaces judge: adds identity similarity (its eval net); "" = off


PRESETS = {"synthfaces": {}}

# -----------------------------------------------------------------------------
# Table 2 metrics (images in [-1, 1], compared on the 0-255 scale as the paper reports them)


def to_uint8(x):
    """(B, 3, H, W) in [-1, 1] -> (B, 3, H, W) float on the 0..255 grid (rounded like a saved PNG)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round()


def mse_255(recon, target, mask=None):
    """Per-image MSE on the 0-255 scale; mask (B, 1, H, W) in {0,1} restricts it to a region. -> (B,)"""
    err = (to_uint8(recon) - to_uint8(target)).square()
    if mask is None:
        return err.flatten(1).mean(1)
    mask = mask.expand_as(err)
    return (err * mask).flatten(1).sum(1) / mask.flatten(1).sum(1).clamp_min(1)


def psnr_from_mse(mse):
    """PSNR in dB from a 0-255 MSE (per image); a perfect reconstruction is capped at 100 dB."""
    return 10 * torch.log10(255.0**2 / mse.clamp_min(255.0**2 * 1e-10))


def ssim(recon, target):
    """Mean SSIM over images (skimage's Gaussian-free 7x7 default, data range 255, channels averaged). -> (B,)"""
    from skimage.metrics import structural_similarity

    r = to_uint8(recon).permute(0, 2, 3, 1).cpu().numpy()
    t = to_uint8(target).permute(0, 2, 3, 1).cpu().numpy()
    return torch.tensor([structural_similarity(a, b, channel_axis=-1, data_range=255.0) for a, b in zip(r, t)])


def reconstruction_metrics(recon, target, boxes=None):
    """Table 2 metrics for a batch -> dict of per-image tensors (mse, psnr, ssim and, with boxes, face_psnr)."""
    from face_encoder import face_mask

    mse = mse_255(recon, target)
    out = {"mse": mse, "psnr": psnr_from_mse(mse), "ssim": ssim(recon, target)}
    if boxes is not None:
        inside = (face_mask(boxes, *target.shape[-2:], alpha=2.0) > 1).float().to(target.device)  # Eq. (2) region
        out["face_psnr"] = psnr_from_mse(mse_255(recon, target, inside))
    return out


def summarize(per_image):
    """{name: [tensors]} -> {name: mean float}; PSNR is averaged per image (the usual convention)."""
    return {k: float(torch.cat(v).mean()) for k, v in per_image.items()}


def plot_curves(metrics_path, png_path, width=640, height=300):
    """train.py metrics.jsonl -> PNG with the loss (left) and the bit accuracy per scale group (right). PIL only."""
    import json

    from PIL import Image, ImageDraw

    rows = [json.loads(line) for line in open(metrics_path) if line.strip()]
    steps = [r["step"] for r in rows]
    series = [("loss", [[r["loss"] for r in rows]], ["black"]),
              ("bit accuracy: coarse / mid / fine", [[r["acc"][g] for r in rows] for g in range(3)],
               ["tab:blue", "orange", "green"])]
    img = Image.new("RGB", (width, height), "white")
    draw, pw = ImageDraw.Draw(img), width // 2
    for panel, (title, ys, colours) in enumerate(series):
        x0, y0, x1, y1 = panel * pw + 45, 25, panel * pw + pw - 10, height - 30
        lo, hi = min(min(y) for y in ys), max(max(y) for y in ys)
        hi = hi if hi > lo else lo + 1e-6
        draw.rectangle([x0, y0, x1, y1], outline="gray")
        draw.text((x0, 5), title, fill="black")
        for v, y in ((lo, y1), (hi, y0)):
            draw.text((panel * pw + 2, y - 6), f"{v:.3f}", fill="black")
        draw.text((x0, y1 + 5), f"step {steps[0]}", fill="black")
        draw.text((x1 - 70, y1 + 5), f"step {steps[-1]}", fill="black")
        for y, colour in zip(ys, colours):
            span = max(1, steps[-1] - steps[0])
            pts = [(x0 + (x1 - x0) * (s - steps[0]) / span, y1 - (y1 - y0) * (v - lo) / (hi - lo))
                   for s, v in zip(steps, y)]
            draw.line(pts, fill=colour.removeprefix("tab:"), width=2)
    img.save(png_path)
    return png_path


def score(judge, images, ref_embs, own, attrs):
    """Judge scores of images (B, 3, H, W) of identities `own` (B,) against reference embeddings (N, E) of all N
    identities: FaceSim to the own reference, top-1 retrieval, and prompt adherence over the attributes (B dicts)."""
    emb = judge.embed(judge.crop(images, judge.detect(images)), "eval")  # (B, E), face found by the judge's detector
    sims = emb @ ref_embs.T  # (B, N)
    logits = judge.classify(images)
    hits = [float(logits[a][b].argmax() == judge.attributes[a].index(v)) for b, at in enumerate(attrs)
            for a, v in at.items()]
    return {"face_sim": sims[torch.arange(len(own)), own], "top1": (sims.argmax(1) == own).float(),
            "prompt_acc": torch.tensor(hits)}


@torch.no_grad()
def evaluate_generation(cfg, device, judge):
    """Table 1/3-style rows on held-out identities: HEAR with the face, the null face (prompt only), and real images
    of the same / another identity as upper bound / chance level."""
    import time

    from sample import Config as SampleConfig
    from sample import generate, load_run
    from data.manifest import load_image, read_manifest

    run = load_run(cfg.ckpt, device)
    size = run["cfg"].image_size
    by_id = {}
    for r in read_manifest(cfg.data_dir, "test"):
        by_id.setdefault(r["identity"], []).append(r)
    ids = sorted(i for i in by_id if len(by_id[i]) > 1)  # a reference image plus at least one prompt
    refs = torch.stack([load_image(by_id[i][0]["crop_path"], (run["cfg"].face_size,) * 2) for i in ids]).to(device)
    ref_embs = judge.embed(refs, "eval")  # (N, E): one reference crop per identity (its image 0)
    rows, gen = {}, torch.Generator(device=device).manual_seed(cfg.seed)
    sampling = SampleConfig(cfg=cfg.guidance, id_scale=cfg.id_scale)
    seconds = 0.0
    for n, i in enumerate(ids):
        recs = by_id[i][1: 1 + cfg.prompts_per_identity]  # prompts = captions of the identity's other images
        own, attrs = torch.full((len(recs),), n, device=device), [r["attributes"] for r in recs]
        prompts = [r["caption_short"] for r in recs]
        crops = refs[n: n + 1].expand(len(recs), -1, -1, -1)
        pool = by_id[ids[(n + 1) % len(ids)]]  # the next identity's images
        other = torch.stack([load_image(pool[k % len(pool)]["path"], (size, size)) for k in range(len(recs))])
        other = other.to(device)
        real = torch.stack([load_image(r["path"], (size, size)) for r in recs]).to(device)
        t = time.time()
        images = generate(run, prompts, crops, sampling, gen)[0]
        seconds += time.time() - t
        null = generate(run, prompts, crops, sampling, gen, null_face=True)[0]  # the same prompts, no face
        for name, x in (("HEAR (face + prompt)", images), ("null face (prompt only)", null),
                        ("real image, same identity (upper bound)", real),
                        ("real image, other identity (chance)", other)):
            for k, v in score(judge, x, ref_embs, own, attrs).items():
                rows.setdefault(name, {}).setdefault(k, []).append(v.cpu())
    table = ["| images | FaceSim | identity top-1 | prompt adherence |", "|---|---|---|---|"]
    for name, m in rows.items():
        m = summarize(m)
        table.append(f"| {name} | {m['face_sim']:.4f} | {m['top1']:.4f} | {m['prompt_acc']:.4f} |")
    n_img = sum(min(len(by_id[i]) - 1, cfg.prompts_per_identity) for i in ids)
    table.append(f"\n{len(ids)} held-out identities x {cfg.prompts_per_identity} prompts, cfg {cfg.guidance}, "
                 f"top-1 chance {1 / len(ids):.3f}, {seconds / n_img:.3f} s per generated image (decoder included)")
    return "\n".join(table)


def main(cfg):
    if cfg.curves:
        return log(f"wrote {plot_curves(cfg.curves, cfg.out or 'curves.png')}")
    if cfg.what == "generation":
        from data.synthfaces.judge import load_judge

        device = setup_device(cfg.device).device
        log(run_info(device))
        table = evaluate_generation(cfg, device, load_judge(cfg.judge, device))
        log(table)
        if cfg.out:
            with open(cfg.out, "w") as f:
                f.write(table + "\n")
        return table
    import tokenizer as tok
    from data.manifest import load_example, read_manifest
    from train import load_tokenizer

    device = setup_device(cfg.device).device
    log(run_info(device))
    records = read_manifest(cfg.data_dir, "test")[: cfg.max_images]
    paths = [p for p in cfg.ckpts.split(",") if p]
    names = cfg.names.split(",") if cfg.names else paths
    judge = None
    if cfg.judge and os.path.isfile(cfg.judge):
        from data.synthfaces.judge import load_judge

        judge = load_judge(cfg.judge, device)
    rows = ["| tokenizer | MSE (0-255) | SSIM | PSNR (dB) | face PSNR (dB) | ID sim |", "|---|---|---|---|---|---|"]
    for name, path in zip(names, paths, strict=True):
        vae = load_tokenizer(path)[0].to(device)
        side = cfg.image_size // vae.cfg.patch_size
        schedule, per_image = tok.small_schedule(side, side), {}
        with torch.no_grad():
            for i in range(0, len(records), 50):
                ex = [load_example(r, (cfg.image_size, cfg.image_size)) for r in records[i: i + 50]]
                x, boxes = torch.stack([e[0] for e in ex]).to(device), torch.stack([e[1] for e in ex])
                recon = vae.decode(vae.quantize(vae.encode(x), schedule)["z"]).float().cpu()
                for k, v in reconstruction_metrics(recon, x.cpu(), boxes).items():
                    per_image.setdefault(k, []).append(v)
                if judge is not None:  # cosine of the judge's evaluator embeddings, reconstruction vs original face
                    emb = [judge.embed(judge.crop(im.to(device), boxes.to(device)), "eval") for im in (recon, x)]
                    per_image.setdefault("id_sim", []).append((emb[0] * emb[1]).sum(1).cpu())
        m = summarize(per_image)
        sim = f"{m['id_sim']:.4f}" if "id_sim" in m else "-"
        rows.append(f"| {name} | {m['mse']:.2f} | {m['ssim']:.4f} | {m['psnr']:.2f} | {m['face_psnr']:.2f} | {sim} |")
    table = "\n".join(rows)
    log(f"held-out identities: {len(records)} images of {cfg.data_dir}\n{table}")
    if cfg.out:
        os.makedirs(os.path.dirname(os.path.abspath(cfg.out)), exist_ok=True)
        with open(cfg.out, "w") as f:
            f.write(table + "\n")
    return table


if __name__ == "__main__":
    cli(main, Config, PRESETS)
