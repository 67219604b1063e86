"""
Generate a person from a face photo and a prompt with a trained HEAR checkpoint.

  python sample.py --ckpt=out/hear/ckpt.pt --face=data/synthfaces/out/crops/id0300_00.png \
      --prompt="a smiling person with a red hat in front of a blue wall" --num_samples=4
  real photos:  python sample.py --preset=infinity_2b --ckpt=out/hear_2b/ckpt.pt --face=me.jpg --prompt="..."

Writes <out> (a grid of num_samples images) and, with --per_scale=True, <out stem>_scales.png: the running sum of
the first k scales decoded, k = 1..K (the paper's Fig. 8 strip; identity detail arrives with the late scales).
"""

import dataclasses
import os

import torch

import face_encoder as fe
import model as hear_model
import tokenizer as tok
from common import UserError, cli, load_checkpoint, log, run_info
from train import Config as TrainConfig
from data.manifest import geometry, load_image
from train import TextToBits, build_global_encoder, build_text_encoder, face_features, load_tokenizer


@dataclasses.dataclass
class Config:
    preset: str = "synthfaces"  # preset name
    ckpt: str = "out/hear/ckpt.pt"  # train.py checkpoint (architecture, text encoder and encoder paths inside)
    face: str = ""  # reference face image (a photo, or a pre-cropped face with face_detector=none)
    prompt: str = ""  # what the image should show
    negative_prompt: str = ""  # optional negative prompt (else the learned null caption)
    out: str = "out/samples/sample.png"  # output PNG (a grid of num_samples)
    num_samples: int = 4  # images for this face + prompt
    cfg: float = 3.0  # classifier-free guidance scale (official default 3)
    tau: float = 1.0  # logit temperature
    top_k: int = 900  # top-k on the 2-way bit logits (a no-op >= 2, kept for parity with the official sampler)
    top_p: float = 0.97  # top-p on the bit logits
    id_scale: float = 1.0  # lambda of Eq. (7): strength of the high-frequency adapter
    h_div_w: float = 1.0  # aspect ratio (height / width) for presets with official aspect templates
    seed: int = 0  # sampling seed
    per_scale: bool = False  # also write the per-scale strip (Fig. 8)
    use_ema: bool = True  # sample with the EMA weights when the checkpoint has them
    face_detector: str = "none"  # none (the image is the face crop) | insightface
    face_model_pack: str = "buffalo_l"  # InsightFace model pack
    face_model_root: str = "~/.insightface"  # looked up as <root>/models/<pack>
    det_thresh: float = 0.5  # face detection score threshold
    crop_margin: float = 0.25  # margin around the detected box for the reference crop
    device: str = "auto"  # auto | cpu | cuda


PRESETS = {"synthfaces": {}, "infinity_2b": {"face_detector": "insightface", "ckpt": "out/hear_2b/ckpt.pt"}}


def load_run(path, device="cpu", use_ema=True):
    """Everything sample.py / eval.py need from a train.py checkpoint -> dict(model, vae, face_encoder, ...)."""
    ckpt = load_checkpoint(path)
    if "model_config" not in ckpt or "text_encoder" not in ckpt:
        raise UserError(f"{path} is not a train.py checkpoint")
    known = {f.name for f in dataclasses.fields(TrainConfig)}  # keys of older/newer versions are ignored
    cfg = TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in ckpt["config"].items() if k in known})
    text_enc, captions, _ = build_text_encoder(cfg, ckpt.get("caption_tokenizer"))
    if isinstance(ckpt["text_encoder"], dict):
        text_enc.load_state_dict(ckpt["text_encoder"])
    hear = hear_model.HEARTransformer(hear_model.ModelConfig(**ckpt["model_config"]))
    hear.load_state_dict(ckpt["ema"] if use_ema and ckpt.get("ema") else ckpt["model"])
    vae, _ = load_tokenizer(cfg.tokenizer_ckpt)
    face_enc, _ = load_tokenizer(cfg.face_encoder_ckpt)
    global_enc = build_global_encoder(cfg, device)
    model = TextToBits(text_enc, hear, False).to(device).eval()
    return {"model": model, "captions": captions, "vae": vae.to(device), "face_encoder": face_enc.to(device),
            "global_encoder": global_enc, "cfg": cfg, "step": ckpt["step"]}


def reference_crop(cfg, size, device):
    """Read the face image, detect (or take) the face, return the square crop (1, 3, size, size) in [-1, 1]."""
    if not cfg.face:
        raise UserError("--face is required: a face photo (or a pre-cropped face with --face_detector=none)")
    image = load_image(cfg.face)  # (3, H, W), one-line error if unreadable
    detector = None
    if cfg.face_detector == "insightface":
        detector = fe.InsightFaceDetector(cfg.face_model_pack, cfg.face_model_root, det_thresh=cfg.det_thresh,
                                          device=device)
    elif cfg.face_detector != "none":
        raise UserError(f"--face_detector={cfg.face_detector!r}: choose none or insightface")
    rgb = ((image.permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()
    face = fe.detect_face(rgb, detector, cfg.face)
    margin = 0.0 if detector is None else cfg.crop_margin
    return fe.square_crop(image, face["box"], margin, size)[None].to(device)


@torch.no_grad()
def generate(run, prompts, crops, cfg, generator, negative=None, null_face=False):
    """prompts (list of B str), crops (B, 3, S, S) -> images (B, 3, H, W) in [-1, 1], per-scale latents.
    null_face: zero face tokens (the null condition of CFG training), i.e. the prompt alone."""
    train_cfg, model, vae = run["cfg"], run["model"], run["vae"]
    device = crops.device
    ids = run["captions"](prompts, padding=True, truncation=True, max_length=train_cfg.text_maxlen,
                          return_tensors="pt").to(device)
    text, lens = model.encode_text(ids["input_ids"], ids["attention_mask"])
    neg_text = neg_lens = None
    if negative:
        neg = run["captions"]([negative] * len(prompts), padding=True, return_tensors="pt").to(device)
        neg_text, neg_lens = model.encode_text(neg["input_ids"], neg["attention_mask"])
    template = tok.nearest_template(cfg.h_div_w) if train_cfg.pn else 1.0
    _, schedule, grid = geometry(train_cfg.pn, train_cfg.image_size, template, vae.cfg.patch_size)
    v_g, v_hf = face_features(run["face_encoder"], run["global_encoder"], crops, train_cfg)  # Eq. (3)-(5) inputs
    if null_face:
        v_g, v_hf = (None if v is None else torch.zeros_like(v) for v in (v_g, v_hf))
    out = model.hear.generate(text, lens, schedule, grid, cfg_scale=cfg.cfg, tau=cfg.tau, top_k=cfg.top_k,
                              top_p=cfg.top_p, generator=generator, negative_text=neg_text, negative_lens=neg_lens,
                              face_global=v_g, face_hf=v_hf, id_scale=cfg.id_scale)
    return vae.decode(out["latent"]), out["per_scale"]


def main(cfg):
    import torchvision

    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if not cfg.prompt:
        raise UserError("--prompt is required")
    run = load_run(cfg.ckpt, device, cfg.use_ema)
    log(f"{run_info(device)} | checkpoint {cfg.ckpt} (step {run['step']})")
    crops = reference_crop(cfg, run["cfg"].face_size, device).expand(cfg.num_samples, -1, -1, -1)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    images, per_scale = generate(run, [cfg.prompt] * cfg.num_samples, crops, cfg, generator, cfg.negative_prompt)
    os.makedirs(os.path.dirname(os.path.abspath(cfg.out)), exist_ok=True)
    torchvision.utils.save_image(torch.cat([crops[:1], images]).add(1).div(2), cfg.out, nrow=cfg.num_samples + 1)
    log(f"wrote {cfg.out} (reference crop, then {cfg.num_samples} samples)")
    if cfg.per_scale:  # Fig. 8: decode the running sum after each scale, for the first sample
        strip = torch.cat([run["vae"].decode(z[:1]) for z in per_scale])
        path = os.path.splitext(cfg.out)[0] + "_scales.png"
        torchvision.utils.save_image(strip.add(1).div(2), path, nrow=len(per_scale))
        log(f"wrote {path} (scales 1..{len(per_scale)})")


if __name__ == "__main__":
    cli(main, Config, PRESETS)
