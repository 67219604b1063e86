"""
The assembled HEAR system, shared by train.py, sample.py, eval.py and bench.py:

  caption   --caption tokenizer--> ids --T5 encoder--> text features ---------------\
  reference face crop --face encoder--> face tokens (v_g, v_hf; Eq. (3)-(5)) ------------+--> HEAR transformer --> bits
  bits --add_scale (Eq. 12)--> summed codes --frozen tokenizer's decoder--> image <-----------------------------/

  load_tokenizer(spec)     a frozen BSQ-VAE: a train_tokenizer.py checkpoint or infinity:<official .pth>
  build_text_encoder(...)  T5 encoder + caption tokenizer: a tiny T5 trained jointly (synthfaces) or a frozen flan-t5
  TextToBits               caption ids -> T5 features -> bit logits: the one trainable module (DDP wraps it)
  build_hear(...)          a new transformer, or official Infinity weights + HEAR's new parameters
  looks_init(...)          synthfaces: the global face path's start, a least-squares map from a face to its looks
  load_run(ckpt)           everything sampling needs, rebuilt from one train.py checkpoint
  reference_crops(...)     reference photos -> detected, square-cropped faces (sample.py, eval.py)
  generate(run, ...)       prompts + reference crops (one or several per person) -> images (sample.py, eval.py)
"""

import dataclasses
import functools
import os
import tempfile

import torch
from PIL import Image
from torch import nn

import face_detect as fd
import face_encoder as fe
import model as hear_model
import tokenizer as tok
from checkpoint import CheckpointMismatchError, load_checkpoint, load_strict
from common import UserError, log
from data.manifest import geometry, load_face_crop, load_image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
MIN_SIDE = 8  # pixels: a smaller image holds no face (detectors find faces of ~10-40 px and more)


def load_tokenizer(spec):
    """Frozen tokenizer from `infinity:<official .pth>` or a train_tokenizer.py checkpoint -> (BSQVAE, ckpt or None)."""
    if spec.startswith("infinity:"):
        try:
            return tok.load_infinity_vae(spec.split(":", 1)[1]).eval().requires_grad_(False), None
        except CheckpointMismatchError as e:
            raise CheckpointMismatchError(f"{spec}: {e}") from None
    ckpt = load_checkpoint(spec)
    if not isinstance(ckpt, dict) or "tokenizer_config" not in ckpt:
        raise UserError(f"{spec} is not a train_tokenizer.py checkpoint (no tokenizer_config)")
    vae = tok.BSQVAE(tok.TokenizerConfig(**ckpt["tokenizer_config"]))
    load_strict(vae, ckpt["model"], spec)
    return vae.eval().requires_grad_(False), ckpt


def build_text_encoder(spec, vocab_json=None, channels=128, layers=2, heads=4):
    """-> (T5 encoder, caption tokenizer, trainable?). spec "tiny": a small T5 built from a config over the word-level
    vocabulary `vocab_json` (prepare.py's tokenizer.json), trained jointly; otherwise a local flan-t5 folder, frozen."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast, T5Config, T5EncoderModel

    if spec != "tiny":
        if not os.path.isdir(spec):
            raise UserError(f"--text_encoder={spec!r}: not a local T5 folder (e.g. weights/flan-t5-xl)")
        t5 = T5EncoderModel.from_pretrained(spec, local_files_only=True)
        caption_tokenizer = AutoTokenizer.from_pretrained(spec, local_files_only=True)
        return t5.eval().requires_grad_(False), caption_tokenizer, False
    from tokenizers import Tokenizer

    caption_tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(vocab_json), pad_token="<pad>",
                                       eos_token="</s>", unk_token="<unk>")
    t5_cfg = T5Config(vocab_size=len(caption_tokenizer), d_model=channels, d_kv=channels // heads, d_ff=2 * channels,
                      num_layers=layers, num_heads=heads, dropout_rate=0.0, pad_token_id=0, eos_token_id=1)
    return T5EncoderModel(t5_cfg), caption_tokenizer, True


def read_vocab(data_dir):
    """The caption vocabulary (tokenizer.json) that data/synthfaces/prepare.py writes next to the manifest."""
    path = os.path.join(data_dir if os.path.isdir(data_dir) else os.path.dirname(data_dir), "tokenizer.json")
    if not os.path.isfile(path):
        raise UserError(f"{path} not found: the tiny text encoder needs the caption vocabulary of prepare.py")
    with open(path) as f:
        return f.read()


class TextToBits(nn.Module):
    """The trainable whole for one DDP wrapper: caption tokens -> T5 features -> HEAR bit logits."""

    def __init__(self, text_encoder, hear, train_text):
        super().__init__()
        self.text_encoder, self.hear, self.train_text = text_encoder, hear, train_text

    def encode_text(self, input_ids, attention_mask):
        """(B, T) ids + mask -> zero-padded features (B, T, Ct), lengths (B,)."""
        with torch.set_grad_enabled(self.train_text and torch.is_grad_enabled()):
            text = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return text.float() * attention_mask[..., None], attention_mask.sum(1)

    def forward(self, input_ids, attention_mask, x_BLC_wo_prefix, schedule, rope_grid, face_global, face_hf, drop):
        text, lens = self.encode_text(input_ids, attention_mask)
        return self.hear(text, lens, x_BLC_wo_prefix, schedule, rope_grid, face_global, face_hf, drop_cond=drop)


def build_hear(cfg, text_channels, d, face_dim, global_dim, weights=None, global_start=None):
    """A new HEAR transformer of cfg's sizes, or `weights` (official Infinity weights, or a base model's train.py
    checkpoint: a path or the loaded dict) with HEAR's new parameters initialised -> (model, load report or None).
    cfg: train.py's Config; global_start: face_global_proj's (weight, bias) (looks_init), which also sets its tokens."""
    hear_cfg = dict(use_global_face=cfg.use_global_face, global_face_dim=global_dim, use_hf_adapter=cfg.use_hf_adapter,
                    hf_face_dim=face_dim, grad_checkpointing=cfg.grad_checkpointing, drop_path_rate=cfg.drop_path_rate)
    if global_start is not None:  # one text-width token per slot of the looks
        hear_cfg["global_face_tokens"] = len(global_start[1]) // text_channels
    if weights is not None:
        model, report = hear_model.load_infinity(weights, **hear_cfg)
    else:
        model, report = hear_model.HEARTransformer(hear_model.ModelConfig(
            depth=cfg.depth, embed_dim=cfg.embed_dim, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, codebook_dim=d,
            text_channels=text_channels, text_maxlen=cfg.text_maxlen, **hear_cfg)), None
    if global_start is not None:
        model.face_global_proj.weight.data.copy_(global_start[0])
        model.face_global_proj.bias.data.copy_(global_start[1])
    return model, report


@torch.no_grad()
def looks_targets(records, text_encoder, caption_tokenizer, text_maxlen):
    """The text features each record's looks have after its own caption -> (R, N, Ct), the same N for every record.
    Each comma-separated trait of caption_person ("with tone 4 skin, white hair, ...") is a slot as wide as its
    longest wording in `records` (its comma included; a shorter wording repeats its last token), so slot k holds trait
    k in every record."""
    @functools.cache  # a few dozen trait wordings, met thousands of times
    def count(text):  # the caption tokenizer splits on words and punctuation, so token counts add up
        return len(caption_tokenizer(text, add_special_tokens=False)["input_ids"])

    if any(not r.get("caption_person") for r in records):
        raise UserError("--global_init=looks needs caption_person in every training record (synthfaces' prepare.py)")
    traits = [r["caption_person"].split(", ") for r in records]
    if len({len(t) for t in traits}) > 1:
        raise UserError("--global_init=looks needs the same traits, in the same order, in every caption_person")
    widths = [max(count(", " + t[k]) for t in traits) for k in range(len(traits[0]))]
    out = []
    for lo in range(0, len(records), 256):
        chunk = records[lo: lo + 256]
        ids = caption_tokenizer([f"{r['caption_short']}, {r['caption_person']}" for r in chunk], padding=True,
                                truncation=True, max_length=text_maxlen, return_tensors="pt")
        feats = text_encoder(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).last_hidden_state
        for b, r in enumerate(chunk):
            pos, slots = count(r["caption_short"]), []
            if int(ids["attention_mask"][b].sum()) != pos + sum(count(", " + t) for t in traits[lo + b]) + 1:  # + </s>
                raise UserError(f"--global_init=looks: {r['caption_short']!r} and its looks are longer than "
                                f"--text_maxlen={text_maxlen} tokens, or the caption tokenizer does not split on words")
            for k, trait in enumerate(traits[lo + b]):
                n = count(", " + trait)
                words = feats[b, pos: pos + n].float()  # (n, Ct): the comma and the trait's words
                slots.append(torch.cat([words, words[-1:].expand(widths[k] - n, -1)]))  # (widths[k], Ct)
                pos += n
            out.append(torch.cat(slots))
    return torch.stack(out)


@torch.no_grad()
def looks_init(records, text_encoder, caption_tokenizer, global_enc, face_size, crop_scale, text_maxlen, ridge=1e-4):
    """synthfaces: where face_global_proj starts -> (weight (N Ct, D_g), bias (N Ct,)), N text-width tokens.

    A web-trained base draws "a woman with red hair" on command, and the synthfaces base learned the same from each
    record's caption_person. Eq. (3) joins the global face tokens to the text, so they can start as those words: the
    ridge-regression map from a training record's v_g (its reference crop through global_enc, one token) to the text
    features of its looks (looks_targets). At step 0 the face then says the person's looks in the base's own words,
    and training starts from the traits a face shows, not from noise (docs/foundation.md, the global face tokens)."""
    if global_enc is None:
        raise UserError("--global_init=looks maps a global encoder's token: pass --global_face=judge:<judge.pt>")
    y = looks_targets(records, text_encoder, caption_tokenizer, text_maxlen).flatten(1)  # (R, N Ct)
    xs, weight = [], next(global_enc.parameters(), None)  # the crops go where the encoder is
    for lo in range(0, len(records), 256):
        crops = torch.stack([load_face_crop(r, face_size, crop_scale) for r in records[lo: lo + 256]])
        v_g = global_enc(crops.to("cpu" if weight is None else weight.device))  # (B, N_g, D_g)
        if v_g.shape[1] != 1:
            raise UserError(f"--global_init=looks maps one global face token, not {v_g.shape[1]}: use judge:<judge.pt>")
        xs.append(v_g.flatten(1).float().cpu())
    x = torch.cat(xs)
    x1 = torch.cat([x, x.new_ones(len(x), 1)], 1)  # (R, D_g + 1): the bias as a constant input
    # argmin |x1 W - y|^2 + ridge R |W|^2: a little shrinkage, so the 65 x 4480 numbers of synthfaces fit stably
    w = torch.linalg.solve(x1.T @ x1 + ridge * len(x) * torch.eye(x1.shape[1]), x1.T @ y)  # (D_g + 1, N Ct)
    return w[:-1].T.contiguous(), w[-1].clone()


# -----------------------------------------------------------------------------
# A trained run, for sampling and evaluation


@dataclasses.dataclass
class Run:
    """Everything sampling needs from one train.py checkpoint."""

    model: TextToBits  # text encoder + HEAR transformer, eval mode
    caption_tokenizer: object  # caption tokenizer (transformers)
    vae: tok.BSQVAE  # the frozen generation tokenizer (its decoder turns bits into pixels)
    face_encoder: tok.BSQVAE  # the frozen high-frequency face encoder
    global_encoder: nn.Module | None  # frozen global encoder of v_g (the judge's, CLIP) or None (v_g = v[:FT])
    config: dict  # the train.py config the checkpoint was trained with
    step: int


def load_run(path, device="cpu", use_ema=True):
    """A train.py checkpoint -> Run on `device` (EMA weights when present and use_ema)."""
    ckpt = load_checkpoint(path)
    if isinstance(ckpt, dict) and "tokenizer_config" in ckpt:
        raise UserError(f"{path} is a train_tokenizer.py checkpoint (a tokenizer); --ckpt takes a train.py "
                        "checkpoint: <train.py out_dir>/ckpt.pt")
    if not isinstance(ckpt, dict) or "model_config" not in ckpt or "config" not in ckpt:
        raise UserError(f"{path} is not a train.py checkpoint (no model_config); pass --ckpt=<out_dir>/ckpt.pt")
    c = ckpt["config"]
    text_enc, caption_tokenizer, _ = build_text_encoder(c["text_encoder"], ckpt.get("caption_tokenizer"),
                                                        c["text_channels"], c["text_layers"], c["text_heads"])
    if isinstance(ckpt.get("text_encoder"), dict):  # trained jointly (tiny); a frozen flan-t5 is read from its folder
        load_strict(text_enc, ckpt["text_encoder"], path)
    hear = hear_model.HEARTransformer(hear_model.ModelConfig(**ckpt["model_config"]))
    load_strict(hear, ckpt["ema"] if use_ema and ckpt.get("ema") else ckpt["model"], path)
    here = os.path.dirname(os.path.abspath(path))

    def beside(name):  # a bare file name is a file next to the checkpoint (the shipped foundation)
        return name if os.path.dirname(name) or ":" in name else os.path.join(here, name)

    vae, face_enc = (load_tokenizer(beside(c[k]))[0].to(device) for k in ("tokenizer_ckpt", "face_encoder_ckpt"))
    spec = c.get("global_face", "lowfreq")
    kind, _, where = spec.partition(":")  # judge:judge.pt -> the judge.pt beside the checkpoint
    spec = f"judge:{beside(where)}" if kind == "judge" else spec
    global_enc = fe.build_global_encoder(spec, device) if hear.cfg.use_global_face else None
    if vae.cfg.codebook_dim != hear.cfg.codebook_dim:  # the tokenizer file was replaced since training
        raise CheckpointMismatchError(f"{path}: its tokenizer {c['tokenizer_ckpt']} has {vae.cfg.codebook_dim} bits "
                                      f"per token, the transformer was trained on {hear.cfg.codebook_dim}; restore "
                                      "the tokenizer it was trained with")
    return Run(TextToBits(text_enc, hear, False).to(device).eval(), caption_tokenizer, vae, face_enc,
               global_enc, c, ckpt["step"])


def face_paths(spec):
    """--face: one image, comma-separated images, or a folder (its images, sorted by name) -> list of paths."""
    if os.path.isdir(spec):
        paths = sorted(os.path.join(spec, f) for f in os.listdir(spec) if f.lower().endswith(IMAGE_SUFFIXES))
        if not paths:
            raise UserError(f"{spec}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
        return paths
    return [p for p in spec.split(",") if p]


def hf_scale_sides(run):
    """{scale number (1-based): pixel side} of the high-frequency face scales (v_hf, Eq. 5) of this run's crops."""
    p, first = run.face_encoder.cfg.patch_size, run.config["hf_first_scale"]
    schedule = fe.face_schedule(run.config["face_size"], p, first)
    return {k + 1: h * p for k, (h, _) in enumerate(schedule) if k >= first}


def reference_crops(paths, detector, size, crop_scale, hf_sides=None):
    """Reference photos -> (crops (R, 3, size, size) in [-1, 1], detected faces [face_detect face dict per photo]):
    the largest face of each photo (face_detect.detect_face), square-cropped with side crop_scale * max(box w, h)
    from the photo at its own resolution. detector None: each image already is the face crop (scale 1).
    hf_sides (hf_scale_sides): warn when a face is too small for high-frequency scales (they get upscaled pixels)."""
    crops, faces = [], []
    for path in paths:
        image = load_image(path)  # (3, H, W), upright; one-line error if unreadable
        if min(image.shape[1:]) < MIN_SIDE:
            raise UserError(f"{path} is {image.shape[2]}x{image.shape[1]} pixels: too small to hold a face (at least "
                            f"{MIN_SIDE} px a side); use a larger photo")
        rgb = ((image.permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()  # (H, W, 3) uint8, the file's pixels
        face = fd.detect_face(rgb, detector, path)
        box = torch.as_tensor(face["box"], dtype=torch.float32)[None]  # (1, 4) pixels
        scale = 1.0 if detector is None else crop_scale
        side = round(scale * float(max(box[0, 2] - box[0, 0], box[0, 3] - box[0, 1])))  # the crop in photo pixels
        empty = [k for k, px in (hf_sides or {}).items() if px > side]
        if empty:
            which = f"scale {empty[0]} is" if len(empty) == 1 else f"scales {empty[0]}-{empty[-1]} are"
            log(f"warning: the face in {path} is {int(box[0, 2] - box[0, 0])}x{int(box[0, 3] - box[0, 1])} px (a "
                f"{side} px crop, upscaled to {size}): high-frequency {which} finer than the photo, without detail of "
                "its own; a photo with a larger face keeps more identity")
        crops.append(fd.square_crop(image[None], box, scale, size))
        faces.append(face)
    return torch.cat(crops), faces


def check_prompt(run, prompt, name="--prompt"):
    """A one-line error for an empty prompt; a warning naming how many tokens are kept when it is longer than the
    checkpoint's text_maxlen (encode_prompts truncates)."""
    if not prompt.strip():
        raise UserError(f"{name} is empty: describe the image to generate")
    n, maxlen = len(run.caption_tokenizer(prompt)["input_ids"]), run.config["text_maxlen"]
    if n > maxlen:
        log(f"warning: {name} is {n} tokens long ({len(prompt)} characters); kept the first {maxlen} tokens "
            "(this checkpoint's text_maxlen)")


def check_output(path, image=True):
    """Before any work: --out is not a folder, its folder can be written (created if needed) and, for an image, its
    extension names a format PIL writes. -> the PIL format name (image) or None."""
    if os.path.isdir(path):
        raise UserError(f"--out={path} is a folder; give a file name, e.g. {os.path.join(path, 'sample.png')}")
    folder, ext = os.path.dirname(os.path.abspath(path)), os.path.splitext(path)[1].lower()
    fmt = Image.registered_extensions().get(ext)
    if image and fmt not in Image.SAVE:
        raise UserError(f"--out={path}: {ext or 'no extension'} is not an image format PIL writes; use .png or .jpg")
    try:
        os.makedirs(folder, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise UserError(f"--out={path}: cannot write in {folder} ({e.strerror}); choose another --out") from None
    return fmt if image else None


def save_image(images, path, nrow):
    """torchvision.utils.save_image of images (N, 3, H, W) in [0, 1] to a temp file next to `path`, then renamed:
    an interrupted run never leaves a half-written image."""
    import torchvision

    fmt, tmp = Image.registered_extensions()[os.path.splitext(path)[1].lower()], f"{path}.tmp{os.getpid()}"
    try:
        torchvision.utils.save_image(images, tmp, nrow=nrow, format=fmt)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def face_conditions(hear, face_enc, global_enc, crops, hf_first_scale, combine="mean"):
    """Reference crops (B, 3, S, S), or (B, R, 3, S, S): R photos of each sample's person -> (v_g or None, v_hf or
    None), the face tokens of the identity paths the transformer was built with (Eq. 3-5). R references combine
    token-wise: v_g is their mean; v_hf their mean (combine="mean", N_hf tokens) or their R sequences one after the
    other (combine="concat", R N_hf tokens: the adapter's attention of Eq. (6) reads them all; R copies of one
    reference attend like that one reference, up to rounding)."""
    if combine not in ("mean", "concat"):
        raise UserError(f"--face_combine={combine!r}: choose mean or concat")
    B, R = crops.shape[0], crops.shape[1] if crops.dim() == 5 else 0
    v_g, v_hf = fe.face_tokens(face_enc, crops.flatten(0, 1) if R else crops, hf_first_scale, global_enc)
    if R:
        v_g = v_g.unflatten(0, (B, R)).mean(1)  # (B, N_g, D_g)
        v_hf = v_hf.unflatten(0, (B, R))  # (B, R, N_hf, d)
        v_hf = v_hf.mean(1) if combine == "mean" else v_hf.flatten(1, 2)  # (B, N_hf, d) or (B, R N_hf, d)
    return (v_g if hear.cfg.use_global_face else None), (v_hf if hear.cfg.use_hf_adapter else None)


def encode_prompts(run, prompts, negative_prompt, device, offload=False):
    """Captions -> T5 features (text, lens, neg_text or None, neg_lens or None). offload: the T5 encoder is moved to
    `device` for this and back to the CPU afterwards, so during generation the accelerator holds only the
    transformer, the tokenizer and the face encoders (a no-op on the CPU)."""
    offload = offload and torch.device(device).type != "cpu"
    run.model.text_encoder.to(device)  # back from the CPU after an offloaded call (else a no-op)

    def encode(texts):
        ids = run.caption_tokenizer(texts, padding=True, truncation=True, max_length=run.config["text_maxlen"],
                                    return_tensors="pt")
        return run.model.encode_text(ids["input_ids"].to(device), ids["attention_mask"].to(device))

    text, lens = encode(prompts)
    neg_text, neg_lens = encode([negative_prompt] * len(prompts)) if negative_prompt else (None, None)
    if offload:
        run.model.text_encoder.to("cpu")
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()  # hand the encoder's memory back, not just to PyTorch's cache
    return text, lens, neg_text, neg_lens


@torch.no_grad()
def generate(run, prompts, crops, generator, cfg_scale=3.0, tau=1.0, top_k=900, top_p=0.97, id_scale=1.0,
             hf_from_scale=0, negative_prompt="", null_face=False, h_div_w=1.0, face_combine="mean",
             offload_text_encoder=False):
    """prompts (B str), reference crops (B or 1, 3, S, S), or (B or 1, R, 3, S, S) for R references per sample
    (face_conditions, combined as face_combine), in [-1, 1] -> (images (B, 3, H, W) in [-1, 1], per-scale running
    sums [(B, d, h_K, w_K)], each at the full latent size, for the Fig. 8 strip). One set of crops serves every
    prompt (encoded once). hf_from_scale: the high-frequency adapter acts from this scale on (id_scale 0 before it).
    null_face: zero face tokens (the null condition of CFG training), i.e. the prompt alone. offload_text_encoder: see
    encode_prompts."""
    c, model, device = run.config, run.model, crops.device
    text, lens, neg_text, neg_lens = encode_prompts(run, prompts, negative_prompt, device, offload_text_encoder)
    template = tok.nearest_template(h_div_w) if c["pn"] else 1.0
    _, schedule, grid = geometry(c["pn"], c["image_size"], template, run.vae.cfg.patch_size)
    v_g, v_hf = face_conditions(model.hear, run.face_encoder, run.global_encoder, crops, c["hf_first_scale"],
                                face_combine)
    v_g, v_hf = (None if v is None else v.expand(len(prompts), -1, -1) for v in (v_g, v_hf))
    if null_face:
        v_g, v_hf = (None if v is None else torch.zeros_like(v) for v in (v_g, v_hf))
    id_scales = [id_scale if k >= hf_from_scale else 0.0 for k in range(len(schedule))]
    out = model.hear.generate(text, lens, schedule, grid, cfg_scale=cfg_scale, tau=tau, top_k=top_k, top_p=top_p,
                              generator=generator, negative_text=neg_text, negative_lens=neg_lens, face_global=v_g,
                              face_hf=v_hf, id_scale=id_scales)
    return run.vae.decode(out["latent"]), out["per_scale"]
