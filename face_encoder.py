"""
The high-frequency face encoder of HEAR (paper section 3.2) and everything that turns a face photo into the tokens
the transformer's identity paths read.

  detection + crop:  InsightFace (FaceAnalysis, model pack buffalo_l) or `none` for pre-cropped faces
  face mask:         Eq. (2)  w = alpha inside the face box, 1 outside
  composite loss:    Eq. (1)  0.2 L1 + 1.0 L2 + 1.0 VQ + 0.5 LPIPS + 0.1 "CLIP" (DINOv2 alignment) + 0.1 identity
  face tokens:       Eq. (5)  v = per-scale codes of the face crop, low -> high frequency; v_hf = v[FT:]

The face encoder itself is a copy of the tokenizer (tokenizer.BSQVAE) fine-tuned with the composite loss by
train_tokenizer.py --face_loss=True; the generation tokenizer is never modified.

References:
  [HEAR]     HEAR: High-frequency Enhanced AutoRegressive modeling for identity-preserving generation (Eq. 1, 2, 5)
  [ArcFace]  Deng et al., arXiv:1801.07698 (IResNet backbones, insightface arcface_torch)
  [AdaFace]  Kim et al., arXiv:2204.00964 (IR-50/101 backbones, the paper's identity loss)
  [DINOv2]   Oquab et al., arXiv:2304.07193
  [LPIPS]    Zhang et al., arXiv:1801.03924

Dimension letters: B batch, H/W image size, h/w latent size, d bits per token, L tokens, E embedding width.
"""

import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import tokenizer as tok


class FaceError(ValueError):
    """A user-facing problem with face input or face models (no face, missing model pack, bad checkpoint)."""


# -----------------------------------------------------------------------------
# Face detection and cropping


class InsightFaceDetector:
    """InsightFace FaceAnalysis wrapper: boxes, 5-point landmarks and the recognition embedding per face.
    The model pack is looked up in <root>/models/<pack> (or `pack` may be a folder); it is never downloaded."""

    def __init__(self, pack="buffalo_l", root="~/.insightface", det_size=640, det_thresh=0.5, device="cpu"):
        folder = os.path.expanduser(pack)
        if not os.path.isdir(folder):
            folder = os.path.join(os.path.expanduser(root), "models", pack)
        has_onnx = os.path.isdir(folder) and any(f.endswith(".onnx") for f in os.listdir(folder))
        if not has_onnx:
            raise FaceError(f"InsightFace model pack '{pack}' not found in {folder}: download {pack}.zip from "
                            "https://github.com/deepinsight/insightface/releases (model-zoo) and unzip it there "
                            "(or set --face_model_root), or use --face_detector=none for pre-cropped faces")
        from insightface.app import FaceAnalysis  # heavy import (onnxruntime, cv2) only when a detector is asked for

        self.app = FaceAnalysis(name=folder, allowed_modules=["detection", "recognition"])
        self.app.prepare(ctx_id=0 if str(device).startswith("cuda") else -1, det_thresh=det_thresh,
                         det_size=(det_size, det_size))
        self.det_thresh = det_thresh

    def __call__(self, image_rgb):
        """image (H, W, 3) uint8 RGB -> list of dicts {box [x0,y0,x1,y1], kps (5,2), score, embedding (512,)},
        largest face first."""
        faces = self.app.get(np.ascontiguousarray(image_rgb[:, :, ::-1]))  # insightface expects BGR
        out = [{"box": f.bbox.astype(np.float32), "kps": f.kps, "score": float(f.det_score),
                "embedding": getattr(f, "normed_embedding", None)} for f in faces]
        return sorted(out, key=lambda f: -(f["box"][2] - f["box"][0]) * (f["box"][3] - f["box"][1]))


def detect_face(image_rgb, detector, name="image"):
    """The largest face of a photo, with a warning naming how many were found. detector=None: the whole image
    is the face (pre-cropped references, synthfaces)."""
    H, W = image_rgb.shape[:2]
    if detector is None:
        return {"box": np.array([0, 0, W, H], np.float32), "kps": None, "score": 1.0, "embedding": None}
    faces = detector(image_rgb)
    if not faces:
        raise FaceError(f"no face found in {name} (threshold {detector.det_thresh}); use a clear frontal photo, "
                        "lower --det_thresh, or pass a pre-cropped face with --face_detector=none")
    if len(faces) > 1:
        print(f"warning: {len(faces)} faces found in {name}; using the largest")
    return faces[0]


def square_box(boxes, scale):
    """The one framing of every face crop: boxes (..., 4) pixels [x0, y0, x1, y1] -> the squares (..., 4) of side
    scale * max(w, h) centred on them (scale 1.4: the synthfaces reference crops and judge; 1.25: CropEmbedder)."""
    boxes = torch.as_tensor(boxes)
    cx, cy = (boxes[..., 0] + boxes[..., 2]) / 2, (boxes[..., 1] + boxes[..., 3]) / 2
    half = scale * torch.maximum(boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]) / 2
    return torch.stack([cx - half, cy - half, cx + half, cy + half], dim=-1)


def square_crop(images, boxes, scale, size):
    """Square face crops (square_box), differentiable w.r.t. the images: bilinear samples, the image border repeated
    outside the image. A crop that shrinks its window k >= 2 times (a large face in a photo) first box-filters the
    image by k (antialiased resize), so the bilinear taps do not alias fine detail.
    images (B, 3, H, W), boxes (B, 4) pixels [x0, y0, x1, y1] -> (B, 3, size, size)."""
    B, _, H, W = images.shape
    sq = square_box(torch.as_tensor(boxes, dtype=images.dtype, device=images.device), scale)  # (B, 4)
    theta = torch.zeros(B, 2, 3, dtype=images.dtype, device=images.device)  # output [-1, 1] -> input [-1, 1]
    theta[:, 0, 0], theta[:, 0, 2] = (sq[:, 2] - sq[:, 0]) / W, (sq[:, 0] + sq[:, 2]) / W - 1
    theta[:, 1, 1], theta[:, 1, 2] = (sq[:, 3] - sq[:, 1]) / H, (sq[:, 1] + sq[:, 3]) / H - 1
    grid = F.affine_grid(theta, (B, 3, size, size), align_corners=False)  # (B, size, size, 2)
    shrink = ((sq[:, 2] - sq[:, 0]) / size).floor().clamp(min=1).long()  # (B,) integer pre-filter factor
    index, crops = [], []
    for k in shrink.unique().tolist():
        idx = (shrink == k).nonzero()[:, 0]
        src = images[idx]
        if k > 1:  # normalised coordinates are resolution-free: the same grid samples the smaller image
            src = F.interpolate(src, size=(max(1, H // k), max(1, W // k)), mode="bilinear", antialias=True)
        index.append(idx)
        crops.append(F.grid_sample(src, grid[idx], mode="bilinear", padding_mode="border", align_corners=False))
    return torch.cat(crops)[torch.cat(index).argsort()]


# -----------------------------------------------------------------------------
# Eq. (2): the face mask


def face_mask(boxes, height, width, alpha=2.0):
    """Eq. (2) [HEAR]: w_ij = alpha for pixels inside the face box R = {x0 <= j <= x1, y0 <= i <= y1}, else 1.
    boxes (B, 4) pixels [x0, y0, x1, y1] -> (B, 1, H, W)."""
    boxes = torch.as_tensor(boxes, dtype=torch.float32)
    cols = torch.arange(width, dtype=torch.float32).view(1, 1, width)  # pixel j covers [j, j+1)
    rows = torch.arange(height, dtype=torch.float32).view(1, height, 1)
    x0, y0, x1, y1 = (boxes[:, i].view(-1, 1, 1) for i in range(4))
    inside = (cols + 0.5 >= x0) & (cols + 0.5 <= x1) & (rows + 0.5 >= y0) & (rows + 0.5 <= y1)  # pixel centres
    return torch.where(inside, alpha, 1.0).unsqueeze(1)


# -----------------------------------------------------------------------------
# IResNet face recognizer (frozen; the identity loss of Eq. (1))


class IBlock(nn.Module):
    """Pre-activation IR block: BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN, plus shortcut."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin, eps=1e-5)
        self.conv1 = nn.Conv2d(cin, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout, eps=1e-5)
        self.prelu = nn.PReLU(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout, eps=1e-5)
        self.stride = stride
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout, eps=1e-5))

    def forward(self, x):
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        if self.downsample is not None:
            return out + self.downsample(x)
        return out + x[:, :, :: self.stride, :: self.stride]  # AdaFace's MaxPool2d(1, stride) == subsampling


class IResNet(nn.Module):
    """IResNet-{18,34,50,100} [ArcFace] at 112x112 -> (B, 512). `layers` = blocks per stage, e.g. (3, 4, 14, 3)."""

    def __init__(self, layers=(3, 4, 14, 3), width=64, emb_dim=512, input_size=112, bgr=False):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width, eps=1e-5)
        self.prelu = nn.PReLU(width)
        chans, cin, stages = [width, 2 * width, 4 * width, 8 * width], width, []
        for n, c in zip(layers, chans):
            stages.append(nn.Sequential(*[IBlock(cin if i == 0 else c, c, 2 if i == 0 else 1) for i in range(n)]))
            cin = c
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.bn2 = nn.BatchNorm2d(cin, eps=1e-5)
        side = input_size // 16
        self.fc = nn.Linear(cin * side * side, emb_dim)
        self.features = nn.BatchNorm1d(emb_dim, eps=1e-5)
        self.input_size, self.bgr = input_size, bgr

    def forward(self, x):
        """x (B, 3, H, W) RGB in [-1, 1] (any size; resized to input_size) -> L2-normalised (B, E)."""
        if x.shape[-1] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        if self.bgr:
            x = x.flip(1)
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.features(self.fc(self.bn2(x).flatten(1)))
        return F.normalize(x, dim=-1)


# AdaFace (github.com/mk-minchul/AdaFace net.py) names -> ours; its ckpt is a Lightning {"state_dict": {"model.*"}}.
_ADAFACE_RENAMES = [("input_layer.0.", "conv1."), ("input_layer.1.", "bn1."), ("input_layer.2.", "prelu."),
                    ("output_layer.0.", "bn2."), ("output_layer.3.", "fc."), ("output_layer.4.", "features."),
                    ("res_layer.0.", "bn1."), ("res_layer.1.", "conv1."), ("res_layer.2.", "bn2."),
                    ("res_layer.3.", "prelu."), ("res_layer.4.", "conv2."), ("res_layer.5.", "bn3."),
                    ("shortcut_layer.", "downsample.")]


def load_iresnet(path):
    """Load a frozen face recognizer. Accepted formats (torch.load weights_only=True):
      - insightface arcface_torch `backbone.pth` (plain state_dict: conv1, bn1, prelu, layer1..4, bn2, fc, features),
        RGB input;
      - AdaFace `adaface_ir{50,101}_*.ckpt` (Lightning dict with state_dict keys `model.input_layer...`), BGR input.
    Depth (blocks per stage) is inferred from the keys."""
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise FaceError(f"cannot read face recognizer {path}: {type(e).__name__}") from None
    sd = sd.get("state_dict", sd)
    adaface = any(k.startswith("model.input_layer") or k.startswith("input_layer") for k in sd)
    if adaface:
        sd = {k.removeprefix("model."): v for k, v in sd.items() if not k.startswith("head.")}
        body = sorted({int(k.split(".")[1]) for k in sd if k.startswith("body.")})
        chans = [sd[f"body.{i}.res_layer.1.weight"].shape[0] for i in body]
        stage_of = {c: s for s, c in enumerate(sorted(set(chans)))}
        counts, renamed, seen = [0, 0, 0, 0], {}, {}
        for i, c in zip(body, chans):
            s = stage_of[c]
            seen[i] = f"layer{s + 1}.{counts[s]}."
            counts[s] += 1
        for k, v in sd.items():
            if k.startswith("body."):
                i = int(k.split(".")[1])
                k = seen[i] + k.split(".", 2)[2]
            for a, b in _ADAFACE_RENAMES:
                k = k.replace(a, b)
            renamed[k] = v
        sd, layers = renamed, tuple(counts)
    else:
        layers = tuple(len({k.split(".")[1] for k in sd if k.startswith(f"layer{s}.")}) for s in range(1, 5))
    if "conv1.weight" not in sd or "fc.weight" not in sd:
        raise FaceError(f"{path} is not an IResNet (arcface_torch) or AdaFace checkpoint: no conv1/fc weights found")
    width = sd["conv1.weight"].shape[0]
    side = int(round((sd["fc.weight"].shape[1] / (8 * width)) ** 0.5))
    net = IResNet(layers, width, sd["fc.weight"].shape[0], input_size=side * 16, bgr=adaface)
    if "features.weight" not in sd:  # AdaFace's final BatchNorm1d has affine=False
        sd["features.weight"], sd["features.bias"] = torch.ones(net.fc.out_features), torch.zeros(net.fc.out_features)
    missing, unexpected = net.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    unexpected = [k for k in unexpected if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise FaceError(f"{path} is not an IResNet/AdaFace checkpoint: missing {missing[:4]}, "
                        f"unexpected {unexpected[:4]}")
    return net.eval().requires_grad_(False)


class CropEmbedder(nn.Module):
    """A recognizer (e.g. IResNet) as an identity embedder of whole images: square face crop of side
    scale * max(box w, h), then the network. (B, 3, H, W), boxes (B, 4) pixels -> (B, E). Differentiable w.r.t. the
    images."""

    def __init__(self, net, scale=1.25):
        super().__init__()
        self.net, self.scale = net, scale

    def forward(self, images, boxes):
        return self.net(square_crop(images, boxes, self.scale, getattr(self.net, "input_size", 112)))


# -----------------------------------------------------------------------------
# Eq. (1): the composite loss of the high-frequency face encoder


class DinoAlign(nn.Module):
    """The paper's "CLIP loss": 1 - cos between the encoder's latent features (through a trainable 1x1 projection)
    and a frozen DINOv2's patch features, resampled to the latent grid."""

    def __init__(self, dino, latent_dim, image_size=224):
        super().__init__()
        self.dino = dino.eval().requires_grad_(False)  # transformers Dinov2Model
        self.proj = nn.Conv2d(latent_dim, dino.config.hidden_size, 1)
        self.image_size = image_size
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)

    def forward(self, features, images):
        """features (B, d, h, w) encoder output, images (B, 3, H, W) in [-1, 1] -> scalar loss."""
        size = (self.image_size, self.image_size)
        x = F.interpolate((images + 1) / 2, size=size, mode="bicubic", align_corners=False)
        with torch.no_grad():
            tokens = self.dino(pixel_values=(x - self.mean) / self.std).last_hidden_state  # (B, 1+R+N, D)
        side = self.image_size // self.dino.config.patch_size
        patches = tokens[:, -side * side:].transpose(1, 2).reshape(len(x), -1, side, side)  # (B, D, s, s)
        target = F.interpolate(patches, size=features.shape[-2:], mode="bilinear", align_corners=False)
        return 1 - F.cosine_similarity(self.proj(features), target, dim=1).mean()


def make_lpips(pretrained=True):
    """Frozen LPIPS (VGG). pretrained=False builds a random backbone (tests only)."""
    import lpips  # imports torchvision; only when the term is on

    try:
        net = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=not pretrained, verbose=False)
    except Exception as e:  # the VGG16 ImageNet weights come from the torch hub cache, never downloaded offline
        raise FaceError("LPIPS needs torchvision's VGG16 weights (vgg16-397923af.pth) in the torch hub cache "
                        f"(~/.cache/torch/hub/checkpoints); fetch them once online or set --lpips_weight=0 "
                        f"({type(e).__name__})") from None
    return net.eval().requires_grad_(False)


class CompositeLoss(nn.Module):
    """Eq. (1) [HEAR]: L = l1 L1 + l2 L2 + vq L_VQ + lpips L_lpips + clip L_clip + id L_id, pixel terms weighted
    by the face mask of Eq. (2). A term with weight 0 or no network is off; `active()` names the terms in use."""

    def __init__(self, weights, lpips_net=None, dino_align=None, id_net=None, alpha=2.0):
        super().__init__()
        self.weights = dict(weights)  # {"l1", "l2", "vq", "lpips", "clip", "id"} -> float
        # id_net: (images (B, 3, H, W), boxes (B, 4)) -> (B, E) embeddings; it crops the face its own way
        self.lpips_net, self.dino_align, self.id_net = lpips_net, dino_align, id_net
        self.alpha = alpha

    def active(self):
        nets = {"lpips": self.lpips_net, "clip": self.dino_align, "id": self.id_net}
        return [k for k, w in self.weights.items() if w > 0 and nets.get(k, True) is not None]

    def forward(self, recon, target, boxes, vq_loss, features):
        """recon, target (B, 3, H, W) in [-1, 1]; boxes (B, 4) pixels; vq_loss scalar; features (B, d, h, w).
        Returns (total, {term: value})."""
        active, terms = self.active(), {}
        B, _, H, W = target.shape
        w = face_mask(boxes, H, W, self.alpha).to(target.device)  # Eq. (2), (B, 1, H, W)
        if "l1" in active:
            terms["l1"] = (w * (recon - target).abs()).mean()
        if "l2" in active:
            terms["l2"] = (w * (recon - target).square()).mean()
        if "vq" in active:
            terms["vq"] = vq_loss
        if "lpips" in active:
            terms["lpips"] = self.lpips_net(recon, target).mean()
        if "clip" in active:
            terms["clip"] = self.dino_align(features, target)
        if "id" in active:  # 1 - cos of a frozen recognizer's embeddings of the reconstructed and the original face
            with torch.no_grad():
                emb_t = self.id_net(target, boxes)
            terms["id"] = (1 - F.cosine_similarity(self.id_net(recon, boxes), emb_t, dim=-1)).mean()
        total = sum(self.weights[k] * v for k, v in terms.items())  # Eq. (1)
        return total, terms


# -----------------------------------------------------------------------------
# Eq. (5): face tokens for the transformer


def hf_split(schedule, hf_first_scale):
    """FT = token count of the first `hf_first_scale` scales (paper: 6 of 13 -> 265 tokens at the 1M square)."""
    return tok.token_offsets(schedule)[hf_first_scale]


@torch.no_grad()
def face_tokens(face_encoder, crops, schedule, hf_first_scale):
    """Encode face crops (B, 3, H, W) in [-1, 1] into frequency-ordered tokens.
    Returns v (B, L_face, d) = per-scale codes concatenated low -> high frequency, v_global = v[:, :FT] (the global
    face tokens of the synthfaces preset) and v_hf = v[:, FT:] (Eq. 5, before W_hf which lives in model.py)."""
    features = face_encoder.encode(crops)  # (B, d, h, w)
    bits = face_encoder.quantize(features, schedule)["bits"]  # K x (B, h_k, w_k, d)
    # tokens from the bits (exact +-1/sqrt(d) values, as decoding sees them), not the straight-through forward value,
    # whose last ulp depends on the batch the crop was encoded in
    v = torch.cat([tok.bits_to_codes(b).flatten(1, 2) for b in bits], dim=1)  # (B, L_face, d)
    ft = hf_split(schedule, hf_first_scale)
    return v, v[:, :ft], v[:, ft:]


class ClipGlobalEncoder(nn.Module):
    """Global face tokens for real presets: a frozen CLIP vision tower (transformers CLIPVisionModelWithProjection);
    returns the projected image embedding as one token (B, 1, E), input crops in [-1, 1]."""

    def __init__(self, clip_vision):
        super().__init__()
        self.clip = clip_vision.eval().requires_grad_(False)
        self.register_buffer("mean", torch.tensor([0.4815, 0.4578, 0.4082]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.2686, 0.2613, 0.2758]).view(1, 3, 1, 1), persistent=False)

    @torch.no_grad()
    def forward(self, crops):
        size = self.clip.config.image_size
        x = F.interpolate((crops + 1) / 2, size=(size, size), mode="bicubic", align_corners=False)
        return self.clip(pixel_values=(x - self.mean) / self.std).image_embeds[:, None]  # (B, 1, E)
