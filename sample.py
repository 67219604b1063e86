"""
Generate a person from a face photo and a prompt with a trained HEAR checkpoint.

  the shipped synthfaces model:  python sample.py --face=assets/faces/held_out_1.png \
      --prompt="photo of a smiling person in a red shirt with a blue hat, yellow background"
  your own run:  python sample.py --ckpt=out/hear/ckpt.pt --face=data/synthfaces/out/crops/id0300_00.png --prompt=...
  real photos:  python sample.py --preset=infinity_2b --ckpt=out/hear_2b/ckpt.pt --face=me.jpg --prompt="..."
  several photos of one person:  --face=a.jpg,b.jpg,c.jpg  or  --face=<folder>  (combined as --face_combine)
  identity strength:  --id_scale (lambda of Eq. (7)) and --hf_from_scale=k (the high-frequency adapter acts only from
      scale k on, like the start-step knobs of PuLID and InfiniteYou); their trade-off curves: study.py --parts=strength

Writes <out> (the reference crops, then num_samples images) and, with --per_scale=True, <out stem>_scales.png: the
running sum of the first k scales decoded, k = 1..K (the paper's Fig. 8 strip; identity detail arrives with the late
scales).
"""

import dataclasses
import math
import os
from typing import Optional

import torch
import torch.nn.functional as F

import face_detect as fd
import tokenizer as tok
from common import UserError, cli, log, resolve_device, run_info
from pipeline import (check_output, check_prompt, face_paths, generate, hf_scale_sides, load_run, reference_crops,
                      save_image)


@dataclasses.dataclass
class Config:
    preset: str = "synthfaces"  # preset name
    ckpt: str = "weights/synthfaces/hear.pt"  # train.py checkpoint (the shipped synthfaces HEAR model by default)
    face: str = ""  # reference face photo(s) of one person: a file, comma-separated files, or a folder
    face_combine: str = "mean"  # several references: mean (tokens averaged) | concat (high-frequency tokens joined)
    prompt: str = ""  # what the image should show
    negative_prompt: str = ""  # optional negative prompt (else the learned null caption)
    out: str = "out/samples/sample.png"  # output PNG (a grid of num_samples)
    num_samples: int = 4  # images for this face + prompt
    cfg: float = 3.0  # classifier-free guidance scale (the official Infinity default; docs/foundation.md on synthfaces)
    tau: float = 0.5  # logit temperature (synthfaces; infinity_2b preset: 1)
    top_k: int = 900  # top-k on the 2-way bit logits (a no-op >= 2, kept for parity with the official sampler)
    top_p: float = 0.97  # top-p on the bit logits
    id_scale: float = 1.0  # lambda of Eq. (7): strength of the high-frequency adapter
    hf_from_scale: int = 0  # the high-frequency adapter acts from this scale on (0: every scale; K or more: never)
    h_div_w: float = 1.0  # aspect ratio (height / width) for presets with official aspect templates
    seed: int = 0  # sampling seed
    per_scale: bool = False  # also write the per-scale strip (Fig. 8)
    use_ema: bool = True  # sample with the EMA weights when the checkpoint has them
    offload_text_encoder: bool = False  # move the T5 encoder to the CPU once the prompt is encoded (GPU memory)
    face_detector: str = "none"  # none (photo = crop) | auto (InsightFace pack, else dlib) | insightface | dlib
    face_model_pack: str = "buffalo_l"  # InsightFace model pack
    face_model_root: str = "~/.insightface"  # looked up as <root>/models/<pack>
    det_thresh: Optional[float] = None  # detection score threshold (None: the backend's own, InsightFace 0.5, dlib 0)
    crop_scale: float = 0.0  # reference crop side / max(detected box w, h) (0 = the checkpoint's crop_scale)
    device: str = "auto"  # auto | cpu | cuda


PRESETS = {"synthfaces": {},
           "infinity_2b": {"face_detector": "auto", "ckpt": "out/hear_2b/ckpt.pt", "tau": 1.0}}


def validate(cfg):
    """Every value checked before any work (nothing loaded, nothing written): one line naming the value and its
    range."""
    lo, hi = min(tok.H_DIV_W_TEMPLATES), max(tok.H_DIV_W_TEMPLATES)
    rules = [("num_samples", cfg.num_samples >= 1, ">= 1"), ("cfg", cfg.cfg >= 0, ">= 0 (1: no guidance)"),
             ("tau", cfg.tau > 0, "> 0"), ("top_k", cfg.top_k >= 0, ">= 0 (0: off)"),
             ("top_p", 0 <= cfg.top_p <= 1, "in [0, 1] (0: off)"), ("id_scale", math.isfinite(cfg.id_scale), "finite"),
             ("crop_scale", cfg.crop_scale >= 0, ">= 0 (0: the checkpoint's)"),
             ("h_div_w", lo <= cfg.h_div_w <= hi, f"in [{lo}, {hi}], the official aspect templates"),
             ("face_combine", cfg.face_combine in ("mean", "concat"), "mean or concat"),
             ("face_detector", cfg.face_detector in ("none", "auto", "insightface", "dlib"),
              "none, auto, insightface or dlib")]
    for name, ok, rule in rules:
        if not ok:
            raise UserError(f"--{name}={getattr(cfg, name)}: must be {rule}")
    if not cfg.prompt.strip():
        raise UserError("--prompt is required (and not blank): what the image should show")
    if not cfg.face:
        raise UserError("--face is required: a face photo (or a pre-cropped face with --face_detector=none)")
    check_output(cfg.out)


def reference_crop(cfg, size, crop_scale, device, hf_sides=None):
    """Read the face photo(s) of --face (validate() has checked it is given), detect (or take) the face of each ->
    square crops (R, 3, size, size) in [-1, 1], one per photo."""
    detector = fd.make_face_detector(cfg.face_detector, cfg.face_model_pack, cfg.face_model_root, cfg.det_thresh,
                                     device, log=log)
    return reference_crops(face_paths(cfg.face), detector, size, crop_scale, hf_sides)[0].to(device)


def fit(crop, hw):
    """A square crop (3, S, S) shown in an (H, W) grid tile: resized to side min(H, W), centred on black."""
    (H, W), side = hw, min(hw)
    if crop.shape[-1] != side:
        crop = F.interpolate(crop[None], size=(side, side), mode="bilinear", antialias=True)[0]
    top, left = (H - side) // 2, (W - side) // 2
    return F.pad(crop, (left, W - side - left, top, H - side - top), value=-1.0)  # (3, H, W), -1 = black


def main(cfg):
    validate(cfg)
    device = resolve_device(cfg.device)
    run = load_run(cfg.ckpt, device, cfg.use_ema)
    log(f"{run_info(device)} | checkpoint {cfg.ckpt} (step {run.step})")
    if not run.config["pn"] and cfg.h_div_w != 1.0:
        raise UserError(f"--h_div_w={cfg.h_div_w}: this checkpoint was trained on square images only (no --pn)")
    check_prompt(run, cfg.prompt)
    if cfg.negative_prompt:
        check_prompt(run, cfg.negative_prompt, "--negative_prompt")
    crop_scale = cfg.crop_scale or run.config.get("crop_scale", 1.4)
    crops = reference_crop(cfg, run.config["face_size"], crop_scale, device, hf_scale_sides(run))  # (R, 3, S, S)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    images, per_scale = generate(run, [cfg.prompt] * cfg.num_samples, crops[None], generator, cfg.cfg, cfg.tau,
                                 cfg.top_k, cfg.top_p, cfg.id_scale, cfg.hf_from_scale,
                                 negative_prompt=cfg.negative_prompt, h_div_w=cfg.h_div_w,
                                 face_combine=cfg.face_combine, offload_text_encoder=cfg.offload_text_encoder)
    tiles = [fit(c, images.shape[-2:]) for c in crops] + list(images)  # reference crops shown at the image size
    save_image(torch.stack(tiles).add(1).div(2), cfg.out, nrow=len(tiles))
    log(f"wrote {cfg.out} ({len(crops)} reference crop(s), then {cfg.num_samples} samples)")
    if cfg.per_scale:  # Fig. 8: decode the running sum after each scale, for the first sample
        strip = torch.cat([run.vae.decode(z[:1]) for z in per_scale])
        path = os.path.splitext(cfg.out)[0] + "_scales" + os.path.splitext(cfg.out)[1]
        save_image(strip.add(1).div(2), path, nrow=len(per_scale))
        log(f"wrote {path} (scales 1..{len(per_scale)})")


if __name__ == "__main__":
    cli(main, Config, PRESETS)
