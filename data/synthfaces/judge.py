"""
The synthfaces judge: small CNNs that stand in, on synthfaces, for the pretrained networks of real-data evaluation
(InsightFace detection + ArcFace/AdaFace recognition, attribute checks of the prompt). All are trained here on the
TRAIN identities only, once, and cached next to the data in <data_dir>/judge.pt.

  scene    one CNN on the full image: a face-box regressor (the detector that finds the face in GENERATED images)
           and one classification head per scene attribute (background, clothing, position, size, lighting, style)
  face     one CNN on the face crop: heads for the attributes that live on the face (expression, accessory and its
           colour); together with the scene heads: prompt adherence
  id_loss  identity embedding, plain conv net, seed+1: the identity loss of the face encoder (differentiable
           w.r.t. its input image)
  id_eval  identity embedding, residual net, seed+2: the FaceSim evaluator. A different architecture and seed, so the
           generator is never scored by the network it was trained against (design.md section 5)
  traits   one CNN on a larger face crop (trait_size), seed+4: one head per identity trait of draw.TRAITS (coarse:
           skin, hair, eyes, nose, ears, facial hair; fine: iris, freckles; also the mole count, read at chance), so
           a generated face can be checked trait by trait against the reference person's true traits (traits.json
           of prepare.py). Trained on trait_ids identities drawn for it alone (draw.py, its own seed
           stream): 300 identities are too few to learn a trait rather than the person who has it

Both identity nets see square face crops (face_detect.square_crop: side = crop_scale * max(box w, h), the framing
of prepare.py's reference crops) resized to id_size, and are trained as classifiers over the train identities with a
CosFace head (logit = s * (cos - m) on the true class [CosFace] arXiv:1801.09414); the embedding is the L2-normalised
feature.

Held-out checks written to <data_dir>/judge_metrics.json: identity top-1 over the train identities on held-out
images of those identities, verification ROC AUC on the never-seen TEST identities, accuracy of every attribute
head and mean IoU of the detector on held-out images, accuracy of every trait head on the test identities' images
beside its chance rate (the share of the most common value).

A library (eval.py and train_tokenizer.py load the trained judge with load_judge) with a command line that trains it,
run from the repo root as a module:
  python -m data.synthfaces.judge                # default data: minutes on 2 CPU cores (docs/performance.md)
  python -m data.synthfaces.judge --preset=tiny --data_dir=/tmp/synthfaces_tiny
  python -m data.synthfaces.judge --force=True --device=cuda       # retrain even if judge.pt exists
  python -m data.synthfaces.judge --only_traits=True              # add the trait readers to an existing judge.pt

Python API (eval.py, train_tokenizer.py): judge = load_judge(path, device); judge.detect(images) -> boxes;
judge.crop(images, boxes, size); judge.embed(x, which="eval"|"loss"); judge.classify(images) -> {attr: logits};
judge.face_sim(generated, reference_crops) -> (B,) cosine;
judge.read_traits(images) -> {trait: logits}. Images are (B, 3, H, W) in [-1, 1].
"""

import json
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import face_detect as fd
from checkpoint import load_checkpoint, load_strict, save_checkpoint
from common import UserError, cli, config_dict, log, lr_schedule, resolve_device
from data.manifest import read_manifest
from data.synthfaces.captions import ATTRIBUTES
from data.synthfaces import draw
from data.synthfaces.draw import COARSE_TRAITS, FINE_TRAITS, TRAITS


@dataclass
class Config:
    data_dir: str = "data/synthfaces/out"  # folder written by prepare.py; judge.pt and judge_metrics.json go here
    force: bool = False  # retrain even if <data_dir>/judge.pt exists
    device: str = "cpu"  # cpu | cuda | auto
    threads: int = 0  # torch CPU threads (0 = all usable cores; 1 on a machine other jobs keep busy, see the end)
    seed: int = 0  # scene net seed; id_loss uses seed+1, id_eval seed+2, the face-attribute net seed+3
    holdout_per_id: int = 3  # last images of every train identity kept out of training (held-out checks)
    id_size: int = 32  # side of the face crops the identity nets see
    embed_dim: int = 64  # identity embedding size
    scene_width: int = 24  # channels of the first scene-net layer (doubled twice)
    id_width: int = 16  # channels of the first identity-net layer
    batch_size: int = 64  # training batch (all nets)
    scene_epochs: int = 8  # epochs of the scene net (detector + scene attributes)
    face_epochs: int = 12  # epochs of the face-attribute net
    id_epochs: int = 12  # epochs of each identity net
    box_weight: float = 10.0  # weight of the box L1 loss against the scene-attribute cross-entropy
    lr: float = 3e-3  # peak AdamW learning rate (linear warmup, cosine decay)
    weight_decay: float = 5e-4  # AdamW weight decay
    cos_margin: float = 0.2  # CosFace additive margin m
    cos_scale: float = 16.0  # CosFace logit scale s
    box_jitter: float = 0.06  # random shift/scale of training crops (fraction of the box side): detector error
    trait_size: int = 64  # side of the face crops the trait readers see (fine traits are 1-2 px at 64x64 images)
    trait_epochs: int = 30  # epochs of the trait readers (the fine ones, iris and freckles, need the most)
    trait_ids: int = 6000  # identities drawn for the trait readers alone (one image each), apart from train and test
    only_traits: bool = False  # train only the trait readers into an existing judge.pt (the other nets keep theirs)


PRESETS = {
    "synthfaces": {},
    "tiny": dict(data_dir="out/synthfaces_tiny", holdout_per_id=2, batch_size=16, scene_epochs=8, face_epochs=8,
                 id_epochs=25, scene_width=8, id_width=8, embed_dim=16, trait_size=32, trait_epochs=8,
                 trait_ids=256),
}

# attributes read on the whole image vs on the face crop
FACE_ATTRIBUTES = ["expression", "accessory", "accessory_color"]
SCENE_ATTRIBUTES = [a for a in ATTRIBUTES if a not in FACE_ATTRIBUTES]
# thresholds the default data must reach (FIX THE DATA, not these numbers, if they fail)
TARGETS = dict(id_top1=0.90, test_auc=0.95, attribute_acc=0.95)

# -----------------------------------------------------------------------------
# Networks. Dimension letters: B batch, E embedding, N identities.


def conv_bn(cin, cout, stride=1, k=3):
    """Conv (no bias) -> BatchNorm -> ReLU. k=4 with stride 2 halves the side exactly (padding 1)."""
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ResBlock(nn.Module):
    """Basic residual block (two 3x3 convs), 1x1 projection shortcut when the shape changes."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.body = nn.Sequential(conv_bn(cin, cout, stride), nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(cout))
        self.skip = nn.Identity() if cin == cout and stride == 1 else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return F.relu(self.body(x) + self.skip(x))


class SceneNet(nn.Module):
    """Full image (B, 3, R, R) -> (box (B, 4) as fractions [x0, y0, x1, y1], {attribute: logits (B, values)})."""

    def __init__(self, resolution, attributes, width=24):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            conv_bn(3, w, 2, k=4),  # (B, w, R/2, R/2)
            conv_bn(w, 2 * w, 2, k=4),  # (B, 2w, R/4, R/4)
            conv_bn(2 * w, 2 * w),
            conv_bn(2 * w, 4 * w, 2, k=4),  # (B, 4w, R/8, R/8)
            conv_bn(4 * w, 4 * w, 2, k=4),  # (B, 4w, R/16, R/16)
            nn.Flatten(),
        )
        self.hidden = nn.Sequential(nn.Linear(4 * w * (resolution // 16) ** 2, 256), nn.ReLU(inplace=True))
        self.box = nn.Linear(256, 4)  # (cx, cy, log w, log h) of the face box
        self.heads = nn.ModuleDict({name: nn.Linear(256, len(values)) for name, values in attributes.items()})

    def forward(self, x):
        h = self.hidden(self.features(x))  # (B, 256)
        b = self.box(h)  # (B, 4)
        c, s = torch.sigmoid(b[:, :2]), torch.exp(b[:, 2:].clamp(-4, 1)) * 0.5  # centre, size (fractions)
        box = torch.cat([c - s / 2, c + s / 2], dim=1)  # (B, 4) fractions of the side
        return box, {name: head(h) for name, head in self.heads.items()}


class FaceAttrNet(nn.Module):
    """Face crop (B, 3, S, S) -> {attribute: logits (B, values)} for the attributes that live on the face."""

    def __init__(self, size, attributes, width=16):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            conv_bn(3, w),  # (B, w, S, S)
            conv_bn(w, 2 * w, 2, k=4), conv_bn(2 * w, 2 * w),  # (B, 2w, S/2, S/2)
            conv_bn(2 * w, 4 * w, 2, k=4),  # (B, 4w, S/4, S/4)
            conv_bn(4 * w, 4 * w, 2, k=4),  # (B, 4w, S/8, S/8)
            nn.Flatten(),
            nn.Linear(4 * w * (size // 8) ** 2, 128), nn.ReLU(inplace=True),
        )
        self.heads = nn.ModuleDict({name: nn.Linear(128, len(values)) for name, values in attributes.items()})

    def forward(self, x):
        h = self.features(x)  # (B, 128)
        return {name: head(h) for name, head in self.heads.items()}


class IdNet(nn.Module):
    """Identity embedder: conv features of the face crop (B, 3, S, S) -> (B, 8w, S/8, S/8) -> flatten -> dropout ->
    Linear -> BatchNorm -> features (B, E) (not normalised). Flatten, not pool: where a mole or a brow sits is
    identity. The two judges differ only in their `features` (plain_features / residual_features)."""

    def __init__(self, features, size, embed_dim, width=16):
        super().__init__()
        self.features = nn.Sequential(*features, nn.Flatten())
        self.embed = nn.Sequential(nn.Dropout(0.2), nn.Linear(8 * width * (size // 8) ** 2, embed_dim),
                                   nn.BatchNorm1d(embed_dim))

    def forward(self, x):
        return self.embed(self.features(x))


def plain_features(w):
    """id_loss: VGG-style plain conv stack, (B, 3, S, S) -> (B, 8w, S/8, S/8)."""
    return [conv_bn(3, w),  # (B, w, S, S)
            conv_bn(w, 2 * w, 2, k=4), conv_bn(2 * w, 2 * w),  # (B, 2w, S/2, S/2)
            conv_bn(2 * w, 4 * w, 2, k=4), conv_bn(4 * w, 4 * w),  # (B, 4w, S/4, S/4)
            conv_bn(4 * w, 8 * w, 2, k=4)]  # (B, 8w, S/8, S/8)


def residual_features(w):
    """id_eval: a small ResNet (strided stem, three residual stages), (B, 3, S, S) -> (B, 8w, S/8, S/8)."""
    return [conv_bn(3, w + w // 2, 2, k=4),  # (B, 1.5w, S/2, S/2)
            ResBlock(w + w // 2, 3 * w),  # (B, 3w, S/2, S/2)
            ResBlock(3 * w, 6 * w, 2),  # (B, 6w, S/4, S/4)
            ResBlock(6 * w, 8 * w, 2)]  # (B, 8w, S/8, S/8)


class CosFaceHead(nn.Module):
    """Class centres W (N, E). logits = s * cos(x, W) - s * m on the true class ([CosFace] Eq. 4)."""

    def __init__(self, embed_dim, n_classes):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_classes, embed_dim))
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.normal_(self.weight, std=self.weight.shape[1] ** -0.5)

    def forward(self, emb, labels=None, scale=16.0, margin=0.0):
        cos = F.normalize(emb, dim=1) @ F.normalize(self.weight, dim=1).T  # (B, N)
        if labels is not None and margin > 0:
            cos = cos - margin * F.one_hot(labels, cos.shape[1])
        return scale * cos


def resize(x, size):
    """(B, 3, h, w) -> (B, 3, size, size), antialiased bilinear (differentiable); no-op at the right size."""
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


class Judge(nn.Module):
    """Container of the trained networks plus the framing constants they were trained with. traits: {trait: values}
    builds the trait readers (judges written without them have none: read_traits is then unavailable)."""

    def __init__(self, resolution, id_size, crop_scale, embed_dim, n_ids, attributes=ATTRIBUTES, scene_width=24,
                 id_width=16, traits=None, trait_size=64):
        super().__init__()
        self.resolution, self.id_size, self.crop_scale = resolution, id_size, crop_scale
        self.attributes = {k: list(v) for k, v in attributes.items()}
        self.scene = SceneNet(resolution, {k: self.attributes[k] for k in SCENE_ATTRIBUTES}, scene_width)
        self.face = FaceAttrNet(id_size, {k: self.attributes[k] for k in FACE_ATTRIBUTES}, id_width)
        self.id_loss = IdNet(plain_features(id_width), id_size, embed_dim, id_width)
        self.id_eval = IdNet(residual_features(id_width), id_size, embed_dim, id_width)
        self.loss_head = CosFaceHead(embed_dim, n_ids)  # train-identity centres (for top-1 checks)
        self.eval_head = CosFaceHead(embed_dim, n_ids)
        self.trait_values, self.trait_size = ({k: list(v) for k, v in traits.items()} if traits else None), trait_size
        self.traits = FaceAttrNet(trait_size, self.trait_values, id_width) if traits else None

    def detect(self, images):
        """(B, 3, H, W) in [-1, 1] -> face boxes (B, 4) [x0, y0, x1, y1] in pixels of the input."""
        box, _ = self.scene(resize(images, self.resolution))
        return box * torch.tensor([images.shape[3], images.shape[2]] * 2, device=box.device, dtype=box.dtype)

    def crop(self, images, boxes, size=None):
        """(B, 3, H, W), (B, 4) pixels -> aligned face crops (B, 3, size, size) (default id_size)."""
        return fd.square_crop(images, boxes, self.crop_scale, size or self.id_size)

    def embed(self, x, which="eval"):
        """Face crops (or reference crops) (B, 3, h, w) in [-1, 1] -> (B, E) L2-normalised. which = eval | loss."""
        if which not in ("eval", "loss"):
            raise ValueError(f"which must be 'eval' or 'loss', not {which!r}")
        net = self.id_eval if which == "eval" else self.id_loss
        return F.normalize(net(resize(x, self.id_size)), dim=1)

    def classify(self, images, boxes=None):
        """(B, 3, H, W) in [-1, 1] -> {attribute: logits (B, len(values))}, every attribute, values in
        self.attributes. Face attributes are read on the crop of `boxes` (pixels; default: the detected face)."""
        box, logits = self.scene(resize(images, self.resolution))
        if boxes is None:
            boxes = box * torch.tensor([images.shape[3], images.shape[2]] * 2, device=box.device, dtype=box.dtype)
        logits.update(self.face(self.crop(images, boxes)))
        return {name: logits[name] for name in self.attributes}

    def read_traits(self, images, boxes=None):
        """(B, 3, H, W) in [-1, 1] -> {trait: logits (B, len(values))}, read on the crop of `boxes` (pixels; default:
        the detected face)."""
        if self.traits is None:
            raise UserError("this judge.pt has no trait readers; add them: python -m data.synthfaces.judge "
                            "--only_traits=True --data_dir=<its data>")
        boxes = self.detect(images) if boxes is None else boxes
        return self.traits(self.crop(images, boxes, self.trait_size))

    def trait_scores(self, images, true, boxes=None):
        """(B, 3, H, W) and the true traits of each image's person [B dicts {trait: value}] -> {"coarse_trait": (B,),
        "fine_trait": (B,)}: the share of draw.py's coarse / fine traits read off the face (of `boxes`, pixels;
        default: the detected face) as the true value."""
        logits = self.read_traits(images, boxes)
        hits = {t: torch.tensor([logits[t][b].argmax().item() == values.index(tr[t]) for b, tr in enumerate(true)])
                for t, values in self.trait_values.items()}
        return {f"{group}_trait": torch.stack([hits[t] for t in names]).float().mean(0).to(images.device)
                for group, names in (("coarse", COARSE_TRAITS), ("fine", FINE_TRAITS))}

    def face_sim(self, generated, reference_crops):
        """FaceSim: detect the face in each generated image, crop, and take the cosine of id_eval embeddings
        with the reference crop. (B, 3, H, W), (B, 3, h, w) -> (B,)"""
        a = self.embed(self.crop(generated, self.detect(generated)), "eval")
        b = self.embed(reference_crops, "eval")
        return (a * b).sum(dim=1)


def load_judge(path, device="cpu"):
    """judge.pt -> Judge in eval mode with frozen weights (inputs can still take gradients, for id_loss)."""
    ckpt = load_checkpoint(path, map_location="cpu")
    if "crop_scale" not in ckpt["judge_config"]:  # written before crop_margin was renamed crop_scale
        raise UserError(f"{path} is from an older judge.py; retrain it: python -m data.synthfaces.judge --force=True")
    judge = Judge(**ckpt["judge_config"])
    load_strict(judge, ckpt["model"], path, "retrain it: python -m data.synthfaces.judge --force=True")
    return judge.to(device).eval().requires_grad_(False)


# -----------------------------------------------------------------------------
# Data


def read_traits(data_dir):
    """<data_dir>/traits.json of prepare.py -> {identity: {trait: value}}, or None for data written without it."""
    path = os.path.join(data_dir, "traits.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)["identities"]


def load_split(data_dir, holdout_per_id):
    """Read every image, crop, box, attribute and identity into tensors. Returns dict of subsets train/held/test:
    images (N, 3, R, R) uint8, crops (N, 3, C, C) uint8, boxes (N, 4) pixels, attrs (N, A) class indices,
    ids (N,) identity index (train identities 0..N-1; test identities numbered after them), and with traits.json
    traits (N, T) class indices of the person's traits."""
    records, traits = read_manifest(data_dir), read_traits(data_dir)
    names = sorted({r["identity"] for r in records if r["split"] == "train"})
    names += sorted({r["identity"] for r in records if r["split"] == "test"})
    index = {n: i for i, n in enumerate(names)}
    per_id = {}
    for r in records:
        per_id.setdefault(r["identity"], []).append(r)
    subset = {"train": [], "held": [], "test": []}
    for name, rs in per_id.items():
        for k, r in enumerate(rs):
            if r["split"] == "test":
                subset["test"].append(r)
            else:
                subset["train" if k < len(rs) - holdout_per_id else "held"].append(r)

    def load(paths):
        return torch.from_numpy(np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])).permute(0, 3, 1, 2)

    out = {}
    for key, rs in subset.items():
        if not rs:
            raise UserError(f"{data_dir}: no {key} images (holdout_per_id too large for train_images?)")
        out[key] = dict(
            images=load([r["path"] for r in rs]),
            crops=load([r["crop_path"] for r in rs]),
            boxes=torch.tensor([r["face_box"] for r in rs], dtype=torch.float32),
            attrs=torch.tensor([[ATTRIBUTES[a].index(r["attributes"][a]) for a in ATTRIBUTES] for r in rs]),
            ids=torch.tensor([index[r["identity"]] for r in rs]),
        )
        if traits is not None:
            out[key]["traits"] = torch.tensor([[TRAITS[t].index(traits[r["identity"]][t]) for t in TRAITS] for r in rs])
    n_train_ids = sum(1 for n in names if per_id[n][0]["split"] == "train")
    return out, n_train_ids


def trait_training_set(meta, n_ids, seed):
    """One image each of n_ids identities drawn for the trait readers alone, with draw.py's identity, context and
    rendering at the data's sizes from their own seed stream ([seed, 3, k]: not a train or test identity) -> dict of
    images (N, 3, R, R) uint8, boxes (N, 4) pixels, traits (N, T) class indices."""
    images, boxes, traits = [], [], []
    for k in tqdm(range(n_ids), desc="trait-reader identities", leave=False, mininterval=1.0):
        rng = np.random.default_rng([seed, 3, k])
        t = draw.sample_identity(rng)
        attrs, jitter = draw.sample_attributes(rng), tuple(rng.uniform(-0.02, 0.02, 3))
        image, _, box = draw.render(t, attrs, meta["resolution"], meta["crop_size"], meta["crop_scale"],
                                    meta["config"]["supersample"], jitter, rng)
        labels = draw.trait_labels(t)
        images.append(np.asarray(image))
        boxes.append(box)
        traits.append([TRAITS[name].index(labels[name]) for name in TRAITS])
    return dict(images=torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2), boxes=torch.tensor(boxes),
                traits=torch.tensor(traits))


def to_float(u8):
    """uint8 (B, 3, H, W) -> float in [-1, 1]."""
    return u8.float() / 127.5 - 1.0


def jitter_boxes(boxes, amount, gen):
    """Shift the centre and scale the side of each box by up to `amount` of its side (mimics detector error)."""
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    r = (torch.rand(len(boxes), 3, generator=gen) * 2 - 1) * amount
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2 + r[:, 0] * w, (boxes[:, 1] + boxes[:, 3]) / 2 + r[:, 1] * h
    k = 1 + r[:, 2]
    return torch.stack([cx - k * w / 2, cy - k * h / 2, cx + k * w / 2, cy + k * h / 2], dim=1)


def box_iou(a, b):
    """IoU of matching boxes (B, 4), (B, 4) -> (B,)"""
    lt, rb = torch.maximum(a[:, :2], b[:, :2]), torch.minimum(a[:, 2:], b[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=1)
    area = lambda x: (x[:, 2:] - x[:, :2]).clamp(min=0).prod(dim=1)  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def roc_auc(scores, labels):
    """Area under the ROC curve = P(score of a random positive > score of a random negative) (ties count 1/2)."""
    _, inverse, counts = torch.unique(scores, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    ranks = (ends - (counts - 1) / 2)[inverse]  # 1-based ranks, ties get their average rank
    labels = labels.bool()
    n_pos, n_neg = labels.sum().item(), (~labels).sum().item()
    return ((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)).item()


# -----------------------------------------------------------------------------
# Training


def fit(name, params, n, epochs, cfg, step_fn, seed):
    """The one training loop of every net: shuffle n samples per epoch, step_fn(idx, gen) -> (loss, acc)."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, n // cfg.batch_size)
    total, step, history = epochs * steps_per_epoch, 0, []
    warmup = max(1, total // 20)  # linear warmup over 5% of the steps, then cosine decay to 0
    bar = tqdm(total=total, desc=name, leave=False, mininterval=1.0)
    for epoch in range(epochs):
        perm, losses, accs = torch.randperm(n, generator=gen), [], []
        for i in range(steps_per_epoch):
            for g in opt.param_groups:
                g["lr"] = lr_schedule(step, cfg.lr, warmup, total)
            loss, acc = step_fn(perm[i * cfg.batch_size:(i + 1) * cfg.batch_size], gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            accs.append(acc)
            step += 1
            bar.update()
        history.append((float(np.mean(losses)), float(np.mean(accs))))
        bar.write(f"{name} epoch {epoch + 1}/{epochs}: loss {history[-1][0]:.3f} train acc {history[-1][1]:.3f}")
    bar.close()
    return history


def main(cfg):
    """Train the judge (or reuse <data_dir>/judge.pt) and return its held-out metrics."""
    ckpt_path = os.path.join(cfg.data_dir, "judge.pt")
    if cfg.only_traits and not os.path.isfile(ckpt_path):
        raise UserError(f"--only_traits=True adds trait readers to {ckpt_path}, which does not exist; train the whole "
                        "judge: python -m data.synthfaces.judge")
    if os.path.isfile(ckpt_path) and not cfg.force and not cfg.only_traits:
        log(f"{ckpt_path} exists; skipping training (--force=True retrains)")
        return load_checkpoint(ckpt_path)["metrics"]
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads or len(os.sched_getaffinity(0)))
    try:
        return train(cfg, ckpt_path)
    finally:
        torch.set_num_threads(threads)  # main() also runs in-process (tests): leave the caller's setting


def train(cfg, ckpt_path):
    """Train every net on the train identities (with --only_traits, only the trait readers, the others loaded from
    ckpt_path), evaluate on held-out images, save judge.pt + metrics."""
    t0 = time.time()
    meta = read_meta(cfg.data_dir)
    device = resolve_device(cfg.device)
    print(json.dumps(config_dict(cfg), indent=1))
    data, n_ids = load_split(cfg.data_dir, cfg.holdout_per_id)
    if "traits" not in data["train"] and cfg.only_traits:
        raise UserError(f"{cfg.data_dir}/traits.json not found: rerun python -m data.synthfaces.prepare (same seed: "
                        "the same images, plus traits.json)")
    R = meta["resolution"]
    log(f"data: {len(data['train']['ids'])} train / {len(data['held']['ids'])} held-out images of {n_ids} train "
        f"identities, {len(data['test']['ids'])} images of test identities | {R}x{R}, "
        f"torch threads {torch.get_num_threads()}")
    judge_config = dict(resolution=R, id_size=cfg.id_size, crop_scale=meta["crop_scale"], embed_dim=cfg.embed_dim,
                        n_ids=n_ids, attributes=ATTRIBUTES, scene_width=cfg.scene_width, id_width=cfg.id_width)
    if "traits" in data["train"]:
        judge_config.update(traits=TRAITS, trait_size=cfg.trait_size)
    nets, earlier = ["scene", "face", "id_loss", "id_eval"] + (["traits"] if "traits" in judge_config else []), {}
    if cfg.only_traits:  # the other nets keep their trained weights (and the metrics they were trained with)
        old = load_checkpoint(ckpt_path, map_location="cpu")
        judge_config = old["judge_config"] | dict(traits=TRAITS, trait_size=cfg.trait_size)
        nets, earlier = ["traits"], old["metrics"]
    judge = init_judge(judge_config, cfg.seed, device)
    if cfg.only_traits:
        judge.load_state_dict({k: v for k, v in old["model"].items() if not k.startswith("traits.")}, strict=False)
    readers = None
    if "traits" in nets:
        readers = {k: v.to(device) for k, v in trait_training_set(meta, cfg.trait_ids, meta["seed"]).items()}
    history = train_nets(judge, {k: v.to(device) for k, v in data["train"].items()}, cfg, device, nets, readers)
    train_time = time.time() - t0
    judge.eval().requires_grad_(False)
    metrics = evaluate(judge, data, device)
    history = earlier.get("history", {}) | history
    metrics.update(train_time_s=round(earlier.get("train_time_s", 0) + train_time, 1),
                   history={k: [[round(loss, 4), round(a, 4)] for loss, a in v] for k, v in history.items()})
    save_checkpoint(dict(model=judge.state_dict(), judge_config=judge_config, config=config_dict(cfg),
                         metrics=metrics), ckpt_path)
    metrics_path = os.path.join(cfg.data_dir, "judge_metrics.json")
    with open(metrics_path, "w") as f:
        f.write(json.dumps(metrics, indent=1) + "\n")
    log(json.dumps({k: v for k, v in metrics.items() if k != "history"}, indent=1))
    ok = (metrics["id_top1_eval"] >= TARGETS["id_top1"] and metrics["test_auc_eval"] >= TARGETS["test_auc"]
          and min(metrics["attribute_acc"].values()) >= TARGETS["attribute_acc"])
    log(f"judge {'meets' if ok else 'MISSES'} the targets {TARGETS} | wrote {ckpt_path} and {metrics_path} "
        f"| trained in {train_time:.0f}s, total {time.time() - t0:.0f}s")
    return metrics


def read_meta(data_dir):
    """<data_dir>/meta.json of prepare.py (resolution and crop framing of the data)."""
    path = os.path.join(data_dir, "meta.json")
    if not os.path.isfile(path):
        raise UserError(f"{path} does not exist; run python -m data.synthfaces.prepare first")
    with open(path) as f:
        meta = json.load(f)
    if "crop_scale" not in meta:  # written before crop_margin was renamed crop_scale
        raise UserError(f"{path} is from an older prepare.py; rerun python -m data.synthfaces.prepare")
    return meta


def init_judge(judge_config, seed, device):
    """A new Judge in train mode; each net gets its own initialisation seed (scene: seed, id_loss: seed+1,
    id_eval: seed+2, face attributes: seed+3, traits: seed+4), so changing one net leaves the others' starting
    weights alone (and --only_traits starts the trait readers where a whole run does)."""
    torch.manual_seed(seed)
    judge = Judge(**judge_config).to(device)
    nets = [(seed, [judge.scene]), (seed + 1, [judge.id_loss, judge.loss_head]),
            (seed + 2, [judge.id_eval, judge.eval_head]), (seed + 3, [judge.face])]
    nets += [(seed + 4, [judge.traits])] if judge.traits is not None else []
    for net_seed, modules in nets:
        torch.manual_seed(net_seed)
        for m in (m for module in modules for m in module.modules()):
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
    return judge.train()


def train_nets(judge, tr, cfg, device, nets, readers=None):
    """The training runs of `nets` on the train tensors tr (load_split's "train", on device), in this order: scene
    net, face attribute net, id_loss, id_eval, and the trait readers on `readers` (trait_training_set, on device).
    Returns {net: [(mean loss, mean train accuracy) per epoch]}."""
    n_train, history = len(tr["ids"]), {}
    col = {name: a for a, name in enumerate(ATTRIBUTES)}  # attribute -> column of tr["attrs"]

    def attribute_loss(logits, idx):
        """Mean cross-entropy over the heads in logits, and their mean batch accuracy."""
        losses = [F.cross_entropy(out, tr["attrs"][idx, col[name]]) for name, out in logits.items()]
        accs = [(out.argmax(1) == tr["attrs"][idx, col[name]]).float().mean().item() for name, out in logits.items()]
        return sum(losses) / len(losses), float(np.mean(accs))

    def face_crops(idx, gen):
        """Crops around jittered true boxes (the detector is never exact), (B, 3, id_size, id_size)."""
        boxes = jitter_boxes(tr["boxes"][idx].cpu(), cfg.box_jitter, gen).to(device)
        return judge.crop(to_float(tr["images"][idx]), boxes)

    # 1. scene net: face box (L1 on the corners as fractions of the side) + the scene attributes
    def scene_step(idx, gen):
        x = to_float(tr["images"][idx])
        x = x + 0.03 * torch.randn(x.shape, generator=gen).to(device)  # a little noise: robustness on generated images
        box, logits = judge.scene(x)
        loss, acc = attribute_loss(logits, idx)
        return loss + cfg.box_weight * F.l1_loss(box, tr["boxes"][idx] / judge.resolution), acc

    if "scene" in nets:
        history["scene"] = fit("scene", judge.scene.parameters(), n_train, cfg.scene_epochs, cfg, scene_step, cfg.seed)

    # 2. face-attribute net, on crops
    def face_step(idx, gen):
        return attribute_loss(judge.face(face_crops(idx, gen)), idx)

    if "face" in nets:
        history["face"] = fit("face", judge.face.parameters(), n_train, cfg.face_epochs, cfg, face_step, cfg.seed + 3)

    # 3-4. identity nets: half the samples are image crops, half the stored reference crops, so that faces found
    # in generated images and `--face` references land in one embedding space
    def id_step(net, head):
        def step(idx, gen):
            x = face_crops(idx, gen)
            use_ref = (torch.rand(len(idx), generator=gen) < 0.5).to(device)
            x = torch.where(use_ref[:, None, None, None], resize(to_float(tr["crops"][idx]), cfg.id_size), x)
            logits = head(net(x), tr["ids"][idx], cfg.cos_scale, cfg.cos_margin)
            loss = F.cross_entropy(logits, tr["ids"][idx])
            return loss, (logits.argmax(1) == tr["ids"][idx]).float().mean().item()
        return step

    for which, net, head, seed in [("id_loss", judge.id_loss, judge.loss_head, cfg.seed + 1),
                                   ("id_eval", judge.id_eval, judge.eval_head, cfg.seed + 2)]:
        if which in nets:
            params = list(net.parameters()) + list(head.parameters())
            history[which] = fit(which, params, n_train, cfg.id_epochs, cfg, id_step(net, head), seed)

    # 5. trait readers, on larger crops around jittered true boxes: one cross-entropy per trait of the person
    def trait_step(idx, gen):
        boxes = jitter_boxes(readers["boxes"][idx].cpu(), cfg.box_jitter, gen).to(device)
        logits = judge.traits(judge.crop(to_float(readers["images"][idx]), boxes, judge.trait_size))
        true = {name: readers["traits"][idx, t] for t, name in enumerate(TRAITS)}
        loss = sum(F.cross_entropy(logits[name], true[name]) for name in TRAITS) / len(TRAITS)
        return loss, float(np.mean([(logits[name].argmax(1) == true[name]).float().mean().item() for name in TRAITS]))

    if "traits" in nets:
        history["traits"] = fit("traits", judge.traits.parameters(), len(readers["traits"]), cfg.trait_epochs, cfg,
                                trait_step, cfg.seed + 4)
    return history


@torch.no_grad()
def evaluate(judge, data, device, batch=256):
    """Held-out metrics. Identity crops use the DETECTED boxes, as eval.py will on generated images."""

    def run(fn, *tensors):
        outs = [fn(*(t[i:i + batch].to(device) for t in tensors)) for i in range(0, len(tensors[0]), batch)]
        return torch.cat(outs) if isinstance(outs[0], torch.Tensor) else outs

    m = {}
    held, test = data["held"], data["test"]
    both = {k: torch.cat([held[k], test[k]]) for k in held}  # never trained on: held-out images and test identities
    boxes = run(lambda x: judge.detect(to_float(x)), both["images"]).cpu()
    iou = box_iou(boxes, both["boxes"])
    m["detector_iou"], m["detector_iou50"] = round(iou.mean().item(), 4), round((iou > 0.5).float().mean().item(), 4)
    logits = run(lambda x: judge.classify(to_float(x)), both["images"])
    m["attribute_acc"] = {name: round(torch.cat([o[name].argmax(1).cpu() for o in logits]).eq(both["attrs"][:, a])
                                      .float().mean().item(), 4) for a, name in enumerate(ATTRIBUTES)}
    n_held = len(held["ids"])
    for which, head in [("eval", judge.eval_head), ("loss", judge.loss_head)]:
        emb = run(lambda x, b: judge.embed(judge.crop(to_float(x), b), which), both["images"], boxes).cpu()
        # identity top-1 among the train identities (nearest class centre), on their held-out images
        pred = (emb[:n_held] @ F.normalize(head.weight, dim=1).cpu().T).argmax(1)
        m[f"id_top1_{which}"] = round(pred.eq(held["ids"]).float().mean().item(), 4)
        # verification on the test identities: every pair of images, same vs different identity
        e, ids = emb[n_held:], test["ids"]
        iu = torch.triu_indices(len(ids), len(ids), offset=1)
        m[f"test_auc_{which}"] = round(roc_auc((e @ e.T)[iu[0], iu[1]], ids[iu[0]] == ids[iu[1]]), 4)
        # reference crop of one image vs the detected face of another (how face_sim is used)
        ref = run(lambda x: judge.embed(to_float(x), which), test["crops"]).cpu()
        off = ~torch.eye(len(ids), dtype=torch.bool)
        m[f"test_auc_ref_{which}"] = round(roc_auc((ref @ e.T)[off], (ids[:, None] == ids[None, :])[off]), 4)
    if judge.traits is not None and "traits" in test:  # on the detected faces of never-seen identities
        logits = run(lambda x: judge.read_traits(to_float(x)), test["images"])
        for t, name in enumerate(TRAITS):
            true = test["traits"][:, t]
            m.setdefault("trait_acc", {})[name] = round(
                torch.cat([o[name].argmax(1).cpu() for o in logits]).eq(true).float().mean().item(), 4)
            m.setdefault("trait_chance", {})[name] = round(true.bincount().max().item() / len(true), 4)
    return m


if __name__ == "__main__":
    cli(main, Config, PRESETS)

# -----------------------------------------------------------------------------
# Expected output on the default data (prepare.py defaults, seed 1337), `python -m data.synthfaces.judge --force=True`
# on 2 CPU cores (AMD EPYC, 2 torch threads), lightly loaded machine:
#   data: 3900 train / 900 held-out images of 300 train identities, 400 images of test identities
#   scene 8 epochs ~28 s, face 12 epochs 23 s, id_loss 12 epochs 27 s, id_eval 12 epochs 44 s; trained in 127 s,
#   131 s wall with evaluation and imports. judge.pt 7.6 MB.
#   detector_iou 0.921 (IoU > 0.5 for 100%) | attribute accuracy: background 0.999, clothing 1.0, accessory 0.996,
#   accessory_color 0.993, expression 0.973, position 1.0, size 0.998, lighting 1.0, style 0.996
#   id_top1 (300 train identities, held-out images): eval 0.994, loss 0.996
#   test-identity verification ROC AUC: eval 0.999, loss 0.999; reference crop vs detected face: eval 0.999, loss 0.999
# Trait readers (`--only_traits=True --threads=1` onto that judge, 6000 reader identities, 30 epochs, 10.5 min on one
# thread of a shared 2-core Intel Xeon), accuracy on the 50 test identities' 400 images (chance: the commonest value):
#   skin 0.965 (0.22), hair_color 0.993 (0.22), hair_style 0.915 (0.20), eye_shape 0.603 (0.34), nose 0.895 (0.42),
#   ears 0.585 (0.38), facial_hair 0.843 (0.52) | iris 0.685 (0.28), freckles 0.88 (0.64) | moles 0.343 (0.32)
# Shared machines: with 2 torch threads on 2 cores that another process also kept busy, the same run took 16 min
# (OpenMP threads wait on each other: 24 img/s vs 1018 img/s with --threads=1 in a face-net benchmark). With the
# machine to itself, --threads=1 takes 213 s instead of 127 s. So: default all cores, --threads=1 when sharing.
