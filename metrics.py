"""
The metrics of the paper's tables, shared by eval.py (the tables) and train_tokenizer.py (its held-out check).

  tokenizers (Table 2 / 4): MSE on the 0-255 scale, PSNR, SSIM, PSNR inside the face box (Eq. (2) region), and on
                            synthfaces the identity similarity of reconstruction and original
  generation (Table 1 / 3, synthfaces): FaceSim against the reference, identity top-1 retrieval, prompt adherence,
                            all through the synthfaces judge's *evaluator* networks (never the identity net the
                            face encoder was trained against); per scale (Fig. 8 as a number): FaceSim of the
                            running sum of the first k scales decoded
  generation (Table 1, real photos): CLIP-T, CLIP-I (transformers CLIP, ViT-L/14 by default), DINO (DINO v1
                            ViT-S/16, the DreamBooth definition), FaceSim (a face_detect backend's identity embedding
                            of the largest face; 0 without a face), all x100 as the paper's Table 1 prints them
  figures                   line_plot: PIL line charts (training curves, the study's per-scale and strength plots)

References:
  [CLIPScore]  Hessel et al., arXiv:2104.08718; CLIP-T x100 as torchmetrics CLIPScore (which also clips at 0)
  [DreamBooth] Ruiz et al., arXiv:2208.12242 (CLIP-I, DINO: cosine of image embeddings, generated vs reference)
  [DINO]       Caron et al., arXiv:2104.14294 (ViT-S/16; transformers facebook/dino-vits16, ViTModel)

Images are (B, 3, H, W) in [-1, 1]; pixel metrics compare them on the 0..255 grid, rounded as a saved PNG would be.
"""

import os

import torch

import tokenizer as tok
from common import UserError
from data.manifest import load_example
from face_encoder import face_mask

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)  # OpenAI CLIP
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # DINO


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
def evaluate_tokenizer(vae, records, image_size, device, judge=None, grid_path=None, batch=16):
    """Encode, multi-scale quantize and decode held-out images -> {metric: mean} (Table 2 / 4). With the synthfaces
    judge, also `id_sim`: the cosine of its evaluator embeddings of the reconstructed and the original face. With
    grid_path, a PNG of 8 originals over their reconstructions. batch 16: faster per image on a CPU than 64 (the
    activations stay in its cache; docs/performance.md)."""
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


def judge_scores(judge, images, ref_embs, own, attrs, traits=None):
    """Synthfaces generation scores of images (B, 3, H, W) of identities `own` (B,) against the reference embeddings
    (N, E) of all N identities: FaceSim to the own reference (the judge finds and crops the face, as a detector would
    in a real photo), top-1 retrieval among the N, and prompt adherence over the prompt's attributes (B dicts). With
    traits (the true traits of each image's reference person, B dicts) and a judge with trait readers, also
    coarse_trait and fine_trait: the share of those traits read off the face. Each attribute's own hits come as
    "prompt_<attribute>" (B,): which part of a prompt a model misses; "prompt_misbound" (B,) is the share of a
    prompt's attributes drawn with a value the prompt gives another one (the shirt's colour on the wall): words
    bound to the wrong thing."""
    boxes = judge.detect(images)  # (B, 4): one detection serves FaceSim and the trait readers
    sims = face_embeddings(judge, images, boxes) @ ref_embs.T  # (B, N)
    logits = judge.classify(images)
    read = [{a: judge.attributes[a][logits[a][b].argmax()] for a in at} for b, at in enumerate(attrs)]
    hits = {a: torch.tensor([float(r[a] == at[a]) for r, at in zip(read, attrs)]) for a in attrs[0]}  # {a: (B,)}
    misbound = [sum(r[a] != v and r[a] in {w for k, w in at.items() if k != a} for a, v in at.items()) / len(at)
                for r, at in zip(read, attrs) if at]
    out = {"face_sim": sims[torch.arange(len(own)), own], "top1": (sims.argmax(1) == own).float(),
           "prompt_acc": torch.stack(list(hits.values()), 1).flatten() if hits else torch.zeros(0)}
    out |= {f"prompt_{a}": h for a, h in hits.items()} | ({"prompt_misbound": torch.tensor(misbound)} if hits else {})
    return out | (judge.trait_scores(images, traits, boxes) if traits is not None and judge.traits is not None else {})


def face_embeddings(judge, images, boxes=None):
    """The judge's evaluator embedding of the face it detects (or of `boxes`) and crops in each image (B, 3, H, W)
    -> (B, E)."""
    return judge.embed(judge.crop(images, judge.detect(images) if boxes is None else boxes), "eval")


@torch.no_grad()
def per_scale_scores(judge, decode, per_scale, ref_embs, own, traits=None):
    """Fig. 8 as numbers. per_scale: the running sums of the first k scales' codes [(B, d, H, W)] * K (what
    model.generate returns), decode: latent -> images. Each sum is decoded and scored exactly as judge_scores scores
    a final image (detect, crop, evaluator embedding, cosine with the own reference ref_embs[own]) -> {"face_sim":
    (K, B)}, with traits (as in judge_scores) also "coarse_trait" and "fine_trait" (K, B); row K - 1 scores the final
    image."""
    rows, out = torch.arange(len(own)), {}
    for z in per_scale:
        images = decode(z)
        boxes = judge.detect(images)
        out.setdefault("face_sim", []).append((face_embeddings(judge, images, boxes) @ ref_embs.T)[rows, own])
        if traits is not None and judge.traits is not None:
            for k, v in judge.trait_scores(images, traits, boxes).items():
                out.setdefault(k, []).append(v)
    return {k: torch.stack(v) for k, v in out.items()}


# -----------------------------------------------------------------------------
# Table 1 on real photos: CLIP-T, CLIP-I, DINO, FaceSim (x100)


def _weights(path, key, name):
    if not os.path.isdir(path):
        raise UserError(f"--{key}={path} not found: put the transformers folder of {name} there (config.json, "
                        f"model.safetensors{', tokenizer files' if 'clip' in name else ''})")
    return path


def load_clip(path, device="cpu"):
    """A local transformers CLIP folder (openai/clip-vit-large-patch14) -> (CLIPModel, its tokenizer), eval mode."""
    from transformers import AutoTokenizer, CLIPModel

    _weights(path, "clip_model", "openai/clip-vit-large-patch14")
    clip = CLIPModel.from_pretrained(path, local_files_only=True).to(device).eval().requires_grad_(False)
    return clip, AutoTokenizer.from_pretrained(path, local_files_only=True)


def load_dino(path, device="cpu"):
    """A local transformers DINO v1 folder (facebook/dino-vits16) -> ViTModel, eval mode."""
    from transformers import ViTModel

    _weights(path, "dino_model", "facebook/dino-vits16")
    return ViTModel.from_pretrained(path, add_pooling_layer=False, local_files_only=True).to(device).eval()


def preprocess(images, resize, crop, mean, std):
    """Images (list of (3, H, W) or (B, 3, H, W)) in [-1, 1] -> (B, 3, crop, crop) network input: each on the 0..255
    grid (as saved), shorter side resized to `resize` (bicubic, antialiased), centre crop, normalised."""
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    out = []
    for x in images:
        x = TF.resize(to_uint8(x) / 255, [resize], InterpolationMode.BICUBIC, antialias=True).clamp(0, 1)
        out.append(TF.normalize(TF.center_crop(x, [crop]), mean, std))
    return torch.stack(out)


def _unit(x):
    """A transformers embedding output -> unit float rows on the CPU."""
    x = x if torch.is_tensor(x) else x.pooler_output  # transformers 5 returns an output object, 4.x a tensor
    return torch.nn.functional.normalize(x.float(), dim=-1).cpu()


@torch.no_grad()
def clip_image_embeds(clip, images):
    """Unit CLIP image embeddings (B, E); CLIPImageProcessor's recipe: resize, centre crop, CLIP mean / std."""
    side = clip.config.vision_config.image_size
    x = preprocess(images, side, side, CLIP_MEAN, CLIP_STD).to(clip.device)
    return _unit(clip.get_image_features(pixel_values=x))


@torch.no_grad()
def clip_text_embeds(clip, tokenizer, prompts):
    """Unit CLIP text embeddings (B, E); prompts longer than CLIP's context (77 tokens) are truncated."""
    ids = tokenizer(prompts, padding=True, truncation=True, return_tensors="pt",
                    max_length=clip.config.text_config.max_position_embeddings).to(clip.device)
    return _unit(clip.get_text_features(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]))


def clip_t(clip, tokenizer, images, prompts):
    """CLIP-T [CLIPScore]: 100 cos(CLIP image embedding of the generated image, CLIP text embedding of its prompt),
    per image (B,), in [-100, 100] (torchmetrics also clips at 0; real CLIP pairs are far above it)."""
    return 100 * (clip_image_embeds(clip, images) * clip_text_embeds(clip, tokenizer, prompts)).sum(-1)


def clip_i(clip, images, refs):
    """CLIP-I [DreamBooth]: 100 cos(CLIP image embedding of the generated image, of its reference photo), (B,)."""
    return 100 * (clip_image_embeds(clip, images) * clip_image_embeds(clip, refs)).sum(-1)


@torch.no_grad()
def dino_embeds(dino, images):
    """Unit DINO CLS embeddings (B, 384 for ViT-S/16), DreamBooth's recipe: resize the shorter side to 256
    (bicubic), centre crop 224, ImageNet mean / std (sizes scaled with the model's image_size)."""
    side = dino.config.image_size
    x = preprocess(images, side * 256 // 224, side, IMAGENET_MEAN, IMAGENET_STD).to(dino.device)
    return _unit(dino(pixel_values=x).last_hidden_state[:, 0])  # CLS token of the last layer (after its norm)


def dino_score(dino, images, refs):
    """DINO [DreamBooth]: 100 cos(DINO ViT-S/16 CLS embedding of the generated image, of its reference photo), (B,)."""
    return 100 * (dino_embeds(dino, images) * dino_embeds(dino, refs)).sum(-1)


def face_sim(detector, images, ref_embeds):
    """FaceSim: 100 cos(identity embedding of the largest face found in each generated image, of its reference
    face), for a face_detect backend (InsightFace or dlib: their numbers are not comparable). An image without a
    face scores 0. images (B, 3, H, W) in [-1, 1], ref_embeds: B unit numpy vectors (E,) of the same backend ->
    (scores (B,), face found (B,) bool)."""
    scores, found = torch.zeros(len(images)), torch.zeros(len(images), dtype=torch.bool)
    for b, x in enumerate(to_uint8(images.float()).byte().permute(0, 2, 3, 1).cpu().numpy()):  # (H, W, 3) RGB
        faces = detector(x)  # largest first (face_detect._rank_faces)
        if faces:
            scores[b], found[b] = 100 * float(faces[0]["embedding"] @ ref_embeds[b]), True
    return scores, found


# -----------------------------------------------------------------------------
# Figures


def line_plot(panels, path, width=640, height=300, cols=2):
    """Line charts drawn with PIL (no plotting library): panels [(title, x name, [(legend, xs, ys, colour)])], `cols`
    per row -> PNG at path. Each panel spans its own value range (written at the left edge); an x axis of at most 12
    values gets a tick label per value (and a dot per point), a longer one its first and last value; legends go
    top-left in their line's colour."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), "white")
    draw, pw, ph = ImageDraw.Draw(img), width // cols, height // -(-len(panels) // cols)
    for i, (title, x_name, lines) in enumerate(panels):
        left, top = (i % cols) * pw, (i // cols) * ph
        x0, y0, x1, y1 = left + 45, top + 25, left + pw - 10, top + ph - 30
        xs = sorted({x for line in lines for x in line[1]})
        lo, hi = min(min(line[2]) for line in lines), max(max(line[2]) for line in lines)
        hi, span = (hi if hi > lo else lo + 1e-6), max(xs[-1] - xs[0], 1e-12)
        draw.rectangle([x0, y0, x1, y1], outline="gray")
        draw.text((x0, top + 5), title, fill="black")
        for v, y in ((lo, y1), (hi, y0)):
            draw.text((left + 2, y - 6), f"{v:.3f}", fill="black")
        ticks = [(x, f"{x:g}") for x in xs] if len(xs) <= 12 else [(xs[0], f"{x_name} {xs[0]:g}"),
                                                                 (xs[-1], f"{x_name} {xs[-1]:g}")]
        drawn = []  # (left, right) of the tick labels drawn: one that would overlap a neighbour is left out
        for x, label in sorted(ticks, key=lambda t: t[0] != xs[-1]):  # the last value's label first: it always shows
            tx = min(x0 + (x1 - x0) * (x - xs[0]) / span - 3 * len(label), x1 - 6 * len(label))
            if all(tx + 6 * len(label) + 4 < a or tx > b + 4 for a, b in drawn):
                draw.text((tx, y1 + 5), label, fill="black")
                drawn.append((tx, tx + 6 * len(label)))
        for j, (legend, lx, ly, colour) in enumerate(lines):
            pts = [(x0 + (x1 - x0) * (x - xs[0]) / span, y1 - (y1 - y0) * (y - lo) / (hi - lo)) for x, y in zip(lx, ly)]
            draw.line(pts, fill=colour, width=2)
            for px, py in pts if len(xs) <= 12 else []:
                draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
            if legend:
                draw.text((x0 + 6, y0 + 4 + 12 * j), legend, fill=colour)
    img.save(path)
    return path


# -----------------------------------------------------------------------------
# Hardware utilisation (bench.py)

# peak dense bf16 FLOP/s per device name substring (H100: the SXM figure; PCIe ~756e12); CPUs and unknown GPUs: None
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "4090": 165e12}


def peak_flops(device):
    """The bf16 peak of a CUDA device from PEAK_FLOPS, for MFU; None on a CPU or an unknown GPU."""
    name = torch.cuda.get_device_name(device) if str(device).startswith("cuda") else ""
    return next((v for k, v in PEAK_FLOPS.items() if name and k in name), None)
