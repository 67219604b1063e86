"""
The training loss of HEAR's high-frequency face encoder (paper section 3.2) and the frozen networks its terms use.

  composite loss:  Eq. (1)  0.2 L1 + 1.0 L2 + 1.0 VQ + 0.5 LPIPS + 0.1 DINOv2 alignment + 0.1 identity,
                            pixel terms weighted by the face mask of Eq. (2) (face_encoder.face_mask)
  DINOv2 term:     the paper's "CLIP loss" L_clip regularises the encoder's tokens with DINOv2 features, so its
                   weight and term are named "dino" here (train_tokenizer.py --dino_weight)
  identity term:   the paper's AdaFace loss: 1 - cos of a frozen recognizer's embeddings; IResNet loads the
                   arcface_torch and AdaFace checkpoint layouts strictly (load_iresnet)

train_tokenizer.py (build_loss) trains the face encoder with it; bench.py times its pixel terms.

References:
  [HEAR]     HEAR: High-frequency Enhanced AutoRegressive modeling for identity-preserving generation, Eq. (1)-(2)
  [ArcFace]  Deng et al., arXiv:1801.07698 (IResNet backbones, insightface arcface_torch)
  [AdaFace]  Kim et al., arXiv:2204.00964 (IR-50/101 backbones, the paper's identity loss)
  [DINOv2]   Oquab et al., arXiv:2304.07193
  [LPIPS]    Zhang et al., arXiv:1801.03924

Dimension letters: B batch, H/W image size, h/w latent size, d bits per token, E embedding width.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from face_detect import FaceError, square_crop
from face_encoder import face_mask


# -----------------------------------------------------------------------------
# IResNet face recognizers (frozen; the identity term of Eq. (1))


class IBlock(nn.Module):
    """Pre-activation IR block: BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN, plus a shortcut: 1x1 conv + BN
    where the layout puts one (arcface: stride != 1 or width change; adaface: width change only), else
    parameter-free subsampling (AdaFace's MaxPool2d(1, stride) is exactly that)."""

    def __init__(self, cin, cout, stride, layout="arcface"):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin, eps=1e-5)
        self.conv1 = nn.Conv2d(cin, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout, eps=1e-5)
        self.prelu = nn.PReLU(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout, eps=1e-5)
        self.stride = stride
        self.downsample = None
        if cin != cout or (stride != 1 and layout == "arcface"):
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout, eps=1e-5))

    def forward(self, x):
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        if self.downsample is not None:
            return out + self.downsample(x)
        return out + x[:, :, :: self.stride, :: self.stride]  # ceil(H / stride) rows, as conv2 (k3, pad 1) gives


class IResNet(nn.Module):
    """IResNet-{18,34,50,100} at 112x112 -> (B, 512); `layers` = blocks per stage, e.g. (3, 4, 14, 3), stage widths
    width * (1, 2, 4, 8), stride 2 in each stage's first block. Two published layouts (input (x / 255 - 0.5) / 0.5):
      arcface  [ArcFace] arcface_torch iresnet: conv shortcut also in block 1 (64 -> 64, stride 2); affine final BN1d
      adaface  [AdaFace] net.py BasicBlockIR: no shortcut tensors there; final BN1d without affine; BGR input. Its
               forward also returns the embedding norm (a quality proxy); the identity loss needs only the direction."""

    def __init__(self, layers=(3, 4, 14, 3), width=64, emb_dim=512, input_size=112, layout="arcface"):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width, eps=1e-5)
        self.prelu = nn.PReLU(width)
        chans, cin, stages = [width, 2 * width, 4 * width, 8 * width], width, []
        for n, c in zip(layers, chans):
            blocks = [IBlock(cin if i == 0 else c, c, 2 if i == 0 else 1, layout) for i in range(n)]
            stages.append(nn.Sequential(*blocks))
            cin = c
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.bn2 = nn.BatchNorm2d(cin, eps=1e-5)
        side = input_size // 16
        self.fc = nn.Linear(cin * side * side, emb_dim)
        self.features = nn.BatchNorm1d(emb_dim, eps=1e-5, affine=layout == "arcface")
        self.input_size, self.layout = input_size, layout
        self.bgr = {"arcface": False, "adaface": True}[layout]  # KeyError for any other layout

    def forward(self, x):
        """x (B, 3, H, W) RGB in [-1, 1] (any size; resized to input_size) -> L2-normalised (B, E)."""
        if x.shape[-1] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        if self.bgr:
            x = x.flip(1)
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.features(self.fc(self.bn2(x).flatten(1)))  # dropout before fc is off at inference
        return F.normalize(x, dim=-1)


# AdaFace (github.com/mk-minchul/AdaFace net.py) names -> ours. output_layer = [BN2d, Dropout, Flatten, Linear, BN1d].
_ADAFACE_RENAMES = [("input_layer.0.", "conv1."), ("input_layer.1.", "bn1."), ("input_layer.2.", "prelu."),
                    ("output_layer.0.", "bn2."), ("output_layer.3.", "fc."), ("output_layer.4.", "features."),
                    ("res_layer.0.", "bn1."), ("res_layer.1.", "conv1."), ("res_layer.2.", "bn2."),
                    ("res_layer.3.", "prelu."), ("res_layer.4.", "conv2."), ("res_layer.5.", "bn3."),
                    ("shortcut_layer.", "downsample.")]


def _adaface_to_ours(sd):
    """AdaFace `body.N.` blocks (numbered straight through) -> `layer{s}.{i}.`, stages split where the width
    changes; all other names through _ADAFACE_RENAMES. Returns (state_dict, blocks per stage)."""
    body = sorted({int(k.split(".")[1]) for k in sd if k.startswith("body.")})
    widths = [sd[f"body.{i}.res_layer.1.weight"].shape[0] for i in body if f"body.{i}.res_layer.1.weight" in sd]
    if len(widths) != len(body) or widths != sorted(widths) or len(set(widths)) != 4:
        raise FaceError("AdaFace checkpoint: expected 4 stages of `body.N.res_layer` IR blocks (IR-18/34/50/101)")
    stage_of = {c: s for s, c in enumerate(sorted(set(widths)))}
    counts, prefix = [0, 0, 0, 0], {}
    for i, c in zip(body, widths):
        prefix[i] = f"layer{stage_of[c] + 1}.{counts[stage_of[c]]}."
        counts[stage_of[c]] += 1
    out = {}
    for k, v in sd.items():
        if k.startswith("body."):
            k = prefix[int(k.split(".")[1])] + k.split(".", 2)[2]
        for a, b in _ADAFACE_RENAMES:
            k = k.replace(a, b)
        out[k] = v
    return out, tuple(counts)


def load_iresnet(path):
    """Load a frozen face recognizer strictly (every tensor used, none missing), torch.load weights_only=True:
    arcface_torch `backbone.pth` (plain state_dict conv1 ... layer1..4 ... features), or AdaFace `adaface_ir*.ckpt`
    (Lightning {"state_dict": {"model.input_layer...", "head.kernel"...}}; the training-only margin head is dropped).
    Depth, width, embedding size and input size are inferred from the tensors."""
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # e.g. a Lightning ckpt whose hyper-parameters are pickled objects
        raise FaceError(f"cannot read face recognizer {path} with weights_only=True ({type(e).__name__}); "
                        "re-save just its state_dict") from None
    sd = sd.get("state_dict", sd) if isinstance(sd, dict) else {}
    layout = "adaface" if any(k.removeprefix("model.").startswith("input_layer.") for k in sd) else "arcface"
    if layout == "adaface":
        sd, layers = _adaface_to_ours({k.removeprefix("model."): v for k, v in sd.items() if not k.startswith("head.")})
    else:
        layers = tuple(len({k.split(".")[1] for k in sd if k.startswith(f"layer{s}.")}) for s in range(1, 5))
    if "conv1.weight" not in sd or "fc.weight" not in sd or 0 in layers:
        raise FaceError(f"{path} is not an IResNet (arcface_torch) or AdaFace checkpoint: no conv1/fc/layer weights")
    width, (emb_dim, flat) = sd["conv1.weight"].shape[0], sd["fc.weight"].shape
    side = max(1, round((flat / (8 * width)) ** 0.5))  # fc reads the (8 width, side, side) map; a misfit fails below
    net = IResNet(layers, width, emb_dim, input_size=side * 16, layout=layout)
    try:
        missing, unexpected = net.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # a tensor of the wrong shape
        name = str(e).split("size mismatch for ")[-1].split(":")[0]
        raise FaceError(f"{path}: tensor {name} has the wrong shape for a {layout} IResNet{list(layers)}") from None
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]  # a counter, unused at inference
    if missing or unexpected:
        raise FaceError(f"{path} does not match the {layout} IResNet{list(layers)} layout: missing {missing[:4]}, "
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
    """The DINOv2 alignment term (the paper's "CLIP loss" L_clip of Eq. (1)): 1 - cos between the encoder's latent
    features (through a trainable 1x1 projection) and a frozen DINOv2's patch features, resampled to the latent grid."""

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
    """Eq. (1) [HEAR]: L = l1 L1 + l2 L2 + vq L_VQ + lpips L_lpips + dino L_dino + id L_id (L_dino: the paper's
    L_clip, DinoAlign; L_id: its L_adaface), pixel terms weighted by the face mask of Eq. (2). A term with weight 0
    or no network is off; `active()` names the terms in use."""

    def __init__(self, weights, lpips_net=None, dino_align=None, id_net=None, alpha=2.0):
        super().__init__()
        self.weights = dict(weights)  # {"l1", "l2", "vq", "lpips", "dino", "id"} -> float
        # id_net: (images (B, 3, H, W), boxes (B, 4)) -> (B, E) embeddings; it crops the face its own way
        self.lpips_net, self.dino_align, self.id_net = lpips_net, dino_align, id_net
        self.alpha = alpha

    def active(self):
        nets = {"lpips": self.lpips_net, "dino": self.dino_align, "id": self.id_net}
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
        if "dino" in active:
            terms["dino"] = self.dino_align(features, target)
        if "id" in active:  # 1 - cos of a frozen recognizer's embeddings of the reconstructed and the original face
            with torch.no_grad():
                emb_t = self.id_net(target, boxes)
            terms["id"] = (1 - F.cosine_similarity(self.id_net(recon, boxes), emb_t, dim=-1)).mean()
        total = sum(self.weights[k] * v for k, v in terms.items())  # Eq. (1)
        return total, terms
