"""
Evaluation of tokenizers on held-out identities (paper Table 2/4: MSE on the 0-255 scale, SSIM, PSNR, and the
PSNR inside the face box, where the face encoder should win).

  python eval.py --ckpts=out/tokenizer/ckpt.pt,out/face_encoder/ckpt.pt
  python eval.py --ckpts=infinity:weights/infinity_vae_d32reg.pth --data_dir=data/faces --image_size=256

Prints a markdown table, one row per checkpoint (and writes it to --out when set).
"""

import dataclasses
import os

import numpy as np
import torch

from common import cli, log, run_info, setup_device


@dataclasses.dataclass
class Config:
    preset: str = "synthfaces"  # preset name
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


def np_images(x):
    """(B, 3, H, W) in [-1, 1] -> list of (H, W, 3) uint8 arrays."""
    return list(to_uint8(x).permute(0, 2, 3, 1).cpu().numpy().astype(np.uint8))


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


def main(cfg):
    if cfg.curves:
        return log(f"wrote {plot_curves(cfg.curves, cfg.out or 'curves.png')}")
    import tokenizer as tok
    from train import load_example, load_tokenizer, read_manifest

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
