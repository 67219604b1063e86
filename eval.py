"""
Evaluation: tokenizer reconstruction (paper Table 2/4: MSE on the 0-255 scale, SSIM, PSNR; plus face-region PSNR),
and HEAR generation on held-out identities (Table 1/3 style: FaceSim, identity retrieval, prompt adherence).

  python eval.py --preset=synthfaces --ckpt=out/hear/ckpt.pt
"""

import numpy as np
import torch

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
