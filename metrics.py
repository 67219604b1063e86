"""
The metrics of the paper's tables, shared by eval.py (the tables) and train_tokenizer.py (its held-out check).

  tokenizers (Table 2 / 4): MSE on the 0-255 scale, PSNR, SSIM, PSNR inside the face box (Eq. (2) region), and on
                            synthfaces the identity similarity of reconstruction and original
  generation (Table 1 / 3, synthfaces): FaceSim against the reference, identity top-1 retrieval, prompt adherence,
                            all through the synthfaces judge's *evaluator* networks (never the identity net the
                            face encoder was trained against)

Images are (B, 3, H, W) in [-1, 1]; pixel metrics compare them on the 0..255 grid, rounded as a saved PNG would be.
"""

import torch

import tokenizer as tok
from data.manifest import load_example
from face_encoder import face_mask


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
    """Per-image SSIM (skimage's 7x7 uniform window, data range 255, channels averaged). -> (B,)"""
    from skimage.metrics import structural_similarity

    r = to_uint8(recon).permute(0, 2, 3, 1).cpu().numpy()
    t = to_uint8(target).permute(0, 2, 3, 1).cpu().numpy()
    return torch.tensor([structural_similarity(a, b, channel_axis=-1, data_range=255.0) for a, b in zip(r, t)])


def reconstruction_metrics(recon, target, boxes=None):
    """Table 2 metrics for a batch -> dict of per-image tensors (mse, psnr, ssim and, with boxes, face_psnr)."""
    mse = mse_255(recon, target)
    out = {"mse": mse, "psnr": psnr_from_mse(mse), "ssim": ssim(recon, target)}
    if boxes is not None:
        inside = (face_mask(boxes, *target.shape[-2:], alpha=2.0) > 1).float().to(target.device)  # Eq. (2) region
        out["face_psnr"] = psnr_from_mse(mse_255(recon, target, inside))
    return out


def summarize(per_image):
    """{name: [per-image tensors]} -> {name: mean float}; PSNR is averaged per image (the usual convention)."""
    return {k: float(torch.cat(v).mean()) for k, v in per_image.items()}


@torch.no_grad()
def evaluate_tokenizer(vae, records, image_size, device, judge=None, grid_path=None, batch=64):
    """Encode, multi-scale quantize and decode held-out images -> {metric: mean} (Table 2 / 4). With the synthfaces
    judge, also `id_sim`: the cosine of its evaluator embeddings of the reconstructed and the original face. With
    grid_path, a PNG of 8 originals over their reconstructions."""
    was_training = vae.training
    vae.eval()
    side = image_size // vae.cfg.patch_size
    schedule, per_image = tok.small_schedule(side, side), {}
    for i in range(0, len(records), batch):
        ex = [load_example(r, (image_size, image_size)) for r in records[i: i + batch]]
        x, boxes = torch.stack([e[0] for e in ex]).to(device), torch.stack([e[1] for e in ex])
        recon = vae.decode(vae.quantize(vae.encode(x), schedule)["z"]).float()
        for k, v in reconstruction_metrics(recon.cpu(), x.cpu(), boxes).items():
            per_image.setdefault(k, []).append(v)
        if judge is not None:
            emb = [judge.embed(judge.crop(im, boxes.to(device)), "eval") for im in (recon, x)]
            per_image.setdefault("id_sim", []).append((emb[0] * emb[1]).sum(1).cpu())
        if grid_path and i == 0:
            import torchvision

            n = min(8, len(x))
            torchvision.utils.save_image(torch.cat([x[:n], recon[:n]]).add(1).div(2), grid_path, nrow=n)
    vae.train(was_training)
    return summarize(per_image)


def judge_scores(judge, images, ref_embs, own, attrs):
    """Synthfaces generation scores of images (B, 3, H, W) of identities `own` (B,) against the reference embeddings
    (N, E) of all N identities: FaceSim to the own reference (the judge finds and crops the face, as a detector would
    in a real photo), top-1 retrieval among the N, and prompt adherence over the prompt's attributes (B dicts)."""
    emb = judge.embed(judge.crop(images, judge.detect(images)), "eval")  # (B, E)
    sims = emb @ ref_embs.T  # (B, N)
    logits = judge.classify(images)
    hits = [float(logits[a][b].argmax() == judge.attributes[a].index(v)) for b, at in enumerate(attrs)
            for a, v in at.items()]
    return {"face_sim": sims[torch.arange(len(own)), own], "top1": (sims.argmax(1) == own).float(),
            "prompt_acc": torch.tensor(hits)}
