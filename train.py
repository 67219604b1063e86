"""
Train HEAR (or plain Infinity-style text-to-image) with bitwise self-correction.

  CPU, synthfaces:   python train.py --preset=synthfaces
  resume:            python train.py --preset=synthfaces --init_from=resume
  DDP (CPU, gloo):   torchrun --standalone --nproc_per_node=2 train.py --preset=synthfaces --device=cpu
  paper recipe:      torchrun --standalone --nproc_per_node=8 train.py --preset=infinity_2b --data_dir=data/faces
                     (add --max-restarts=N: a restarted attempt resumes from out_dir/ckpt.pt by itself)

Faults (checkpoint.Faults): SIGTERM / Ctrl-C saves a checkpoint at the end of the current step, then exits with 128 +
the signal number; a NaN / inf loss stops the run naming the step (the last checkpoint kept) or, with
--nan_policy=skip, drops that update and counts it; a lost DDP rank stops the others with one line.

One step: the targets' frozen tokenizer latents -> bitwise self-correction (Eq. (11)-(12)) -> teacher-forced next-scale
logits (Eq. 8) conditioned on the caption (short or long, p = 0.5), the reference face's global tokens (Eq. (3)-(4)) and
high-frequency tokens (Eq. (5)-(7)) -> bitwise cross-entropy. Text and face are dropped together with p = 0.1 for CFG.
The data (manifest format, images, batches, reference choice) is in data/manifest.py; the model in pipeline.py.
"""

import copy
import dataclasses
import json
import os
import time

import torch
import torch.nn as nn
from tqdm import tqdm

import face_encoder as fe
import model as hear_model
import tokenizer as tok
from checkpoint import Faults, init_after_restart, load_checkpoint, load_strict, poison, save_checkpoint
from common import UserError, autocast, cli, log, lr_schedule, run_info, save_config, seeded_generator, setup_device
from data.manifest import (aspect_buckets, caption, epoch_batches, geometry, identity_pools, load_example,
                           load_face_crop, pick_references, read_manifest)
from metrics import peak_flops
from pipeline import (TextToBits, build_hear, build_text_encoder, face_conditions, load_tokenizer, looks_init,
                      read_vocab)


# -----------------------------------------------------------------------------
# Config


@dataclasses.dataclass
class Config:
    preset: str = "synthfaces"  # preset name (recorded in the checkpoint)
    data_dir: str = "data/synthfaces/out"  # folder (or file) of the JSONL manifest (format above)
    out_dir: str = "out/hear"  # checkpoints, config.json, log.txt, metrics.jsonl
    init_from: str = "scratch"  # scratch | resume | infinity:<official infinity_2b_reg.pth> | <train.py ckpt> (a base)
    tokenizer_ckpt: str = "out/tokenizer/ckpt.pt"  # frozen generation tokenizer: our ckpt or infinity:<vae .pth>
    face_encoder_ckpt: str = "out/face_encoder/ckpt.pt"  # frozen face encoder (train_tokenizer.py, face preset)
    # transformer (ignored with init_from=infinity:..., where the weights fix the sizes)
    depth: int = 4  # blocks
    embed_dim: int = 128  # C
    num_heads: int = 4  # heads (head_dim multiple of 4)
    mlp_ratio: float = 4.0  # FFN width ratio
    text_maxlen: int = 80  # longest caption in tokens (rows of the learned null caption)
    drop_path_rate: float = 0.0  # stochastic depth
    # text encoder
    text_encoder: str = "tiny"  # tiny (a small T5 over the vocab <data_dir>/tokenizer.json) | <flan-t5 folder> (frozen)
    text_init: str = ""  # the tiny T5's starting weights: a train_text_encoder.py checkpoint ("" = random)
    train_text: bool = True  # train the tiny T5 with the transformer (False: frozen, as the paper's Flan-T5)
    text_channels: int = 128  # Ct of the tiny T5 (>= 128)
    text_layers: int = 2  # tiny T5 layers
    text_heads: int = 4  # tiny T5 heads
    # HEAR
    use_global_face: bool = True  # Eq. (3)-(4): global face tokens join the text in cross-attention
    use_hf_adapter: bool = True  # Eq. (5)-(7): decoupled high-frequency cross-attention
    hf_first_scale: int = 3  # FT = tokens of the first hf_first_scale face scales (paper: 6 of 13)
    global_face: str = "lowfreq"  # v_g: lowfreq (face encoder's v[:FT]) | judge:<judge.pt> | clip:<CLIP vision folder>
    global_init: str = "random"  # face_global_proj's start: random | looks (synthfaces: the looks in words)
    train_params: str = "all"  # all | adapter (HEAR's new params + cross-attn W_Q, W_K, W_V + W_g) | hear (new only)
    # data
    image_size: int = 64  # square training size when pn == ""
    pn: str = ""  # official pixel budget 0.06M | 0.25M | 0.60M | 1M: aspect buckets from the templates
    face_size: int = 64  # reference face crop size for the face encoder
    crop_scale: float = 1.4  # reference crop side / max(face box w, h) when a record has no crop_path (synthfaces' own)
    short_caption_prob: float = 0.5  # P(short caption) (paper: 0.5)
    person_caption_prob: float = 0.0  # P(a short caption also gets its record's caption_person: the person's looks)
    self_ref_prob: float = 0.5  # P(reference = the target's own face), else another image of the person (paper: 0)
    cache_features: bool = True  # keep frozen tokenizer latents / face tokens in memory (small datasets)
    # optimisation (paper: AdamW lr 1e-4, wd 0.01)
    batch_size: int = 16  # global batch in images, over ranks and accumulation steps (16 learns more per image than 32)
    grad_accum: int = 1  # micro-steps per optimizer step
    max_iters: int = 900  # optimizer steps (synthfaces: what the from-scratch quick start's time bound leaves)
    learning_rate: float = 2e-3  # AdamW peak lr (paper, 2B fine-tune: 1e-4)
    warmup_iters: int = 50  # linear warmup
    cosine_decay: bool = True  # decay the lr to min_lr_ratio x peak (a cosine); False: constant, as in the paper
    min_lr_ratio: float = 0.1  # the end of the cosine decay, as a fraction of the peak
    hear_lr_mult: float = 1.0  # lr of HEAR's new parameters (face projections, W'_K, W'_V) / learning_rate
    weight_decay: float = 0.01  # AdamW wd (no decay on norms, biases, embeddings, gains)
    beta2: float = 0.97  # AdamW beta2 (Infinity 0.97)
    grad_clip: float = 1.0  # grad-norm clip (0 = off)
    bsc_p_max: float = 0.3  # bitwise self-correction: flip rate drawn from {0, 0.01, ..., p_max} per scale
    reweight_by_scale: bool = True  # token weights proportional to sqrt(area_K / area_k) (official intent)
    face_loss_weight: float = 1.0  # alpha of Eq. (2) on the tokens over the target's face box (1: uniform, the paper)
    cond_drop_prob: float = 0.1  # P(drop text and face together) for classifier-free guidance
    ema_decay: float = 0.0  # EMA of the transformer weights (0 = off); sample/eval use it when present
    grad_checkpointing: bool = False  # recompute blocks in backward (2B at 1024 px needs it)
    # runtime
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "bfloat16"  # CUDA autocast dtype
    compile: bool = True  # torch.compile each block (CPU too: inductor): faster steps after a one-off compile
    seed: int = 0  # init, data order and each step's randomness (with the step and the rank)
    log_interval: int = 25  # steps between log lines
    save_interval: int = 500  # steps between checkpoints (and at the end, and on SIGTERM / SIGINT)
    nan_policy: str = "stop"  # a NaN / inf loss: stop (error, last checkpoint kept) | skip (drop the update, count it)
    dist_timeout_s: float = 600.0  # DDP: seconds a collective waits for a lost rank before the run stops with an error


PRESETS = {
    # v_g from the shipped judge's loss identity net: the synthfaces stand-in for the paper's pretrained global encoder
    "synthfaces": {"global_face": "judge:weights/synthfaces/judge.pt"},
    "infinity_2b": {"init_from": "infinity:weights/infinity_2b_reg.pth", "out_dir": "out/hear_2b",
                    "tokenizer_ckpt": "infinity:weights/infinity_vae_d32reg.pth",
                    "face_encoder_ckpt": "out/face_encoder_2b/ckpt.pt", "text_encoder": "weights/flan-t5-xl",
                    "text_maxlen": 512, "pn": "1M", "face_size": 1024, "hf_first_scale": 6,
                    "global_face": "clip:weights/clip-vit-large-patch14", "batch_size": 64, "max_iters": 500000,
                    "learning_rate": 1e-4, "warmup_iters": 0, "drop_path_rate": 0.1, "cache_features": False,
                    "grad_checkpointing": True, "compile": True, "ema_decay": 0.9999, "log_interval": 100,
                    "train_params": "adapter", "self_ref_prob": 0.0, "cosine_decay": False,  # the paper's recipe
                    "save_interval": 5000},
    # the synthfaces foundation's text-to-image base: no identity paths (the face encoder is never read)
    # its text encoder pretrained on captions (train_text_encoder.py) and frozen, as HEAR's Flan-T5; most short
    # captions also describe the person, as web captions do, so the base can draw a person from words
    "synthfaces_base": {"out_dir": "out/base", "use_global_face": False, "use_hf_adapter": False, "max_iters": 12000,
                        "face_encoder_ckpt": "out/tokenizer/ckpt.pt", "save_interval": 1000,
                        "text_init": "out/text_encoder/ckpt.pt", "train_text": False, "person_caption_prob": 0.7},
    # HEAR fine-tuned on the shipped base (quickstart.py): the identity paths are new (at 10x the lr), the rest starts
    # pretrained; the global face tokens start as the looks in words. A short run: the lr stays high longer (warmup 20,
    # cosine to 0.3x), the face tokens weigh 5x, every scale's tokens alike (the loss sits in the last scales, where
    # identity arrives); compiling would cost more than it saves (docs/foundation.md, the quick start's fine-tune)
    "synthfaces_hear": {"init_from": "weights/synthfaces/base.pt", "tokenizer_ckpt": "weights/synthfaces/tokenizer.pt",
                        "global_face": "judge:weights/synthfaces/judge.pt", "max_iters": 500, "train_text": False,
                        "warmup_iters": 20, "min_lr_ratio": 0.3, "face_loss_weight": 5.0, "reweight_by_scale": False,
                        "compile": False, "global_init": "looks", "hear_lr_mult": 10.0},
    "tiny": {"depth": 2, "embed_dim": 64, "num_heads": 4, "image_size": 16, "face_size": 16, "hf_first_scale": 2,
             "batch_size": 4, "max_iters": 4, "warmup_iters": 1, "log_interval": 1, "save_interval": 2,
             "text_layers": 1, "text_heads": 2, "compile": False},
}


# -----------------------------------------------------------------------------
# Building a run


@dataclasses.dataclass
class TrainState:
    """What one training run holds (built by build_state; no behaviour of its own)."""

    dist: object  # common.Dist: rank, world size, device
    records: list  # the training split of the manifest
    buckets: dict  # aspect template -> record indices
    pools: dict  # identity -> record indices (reference choice)
    vae: tok.BSQVAE  # frozen generation tokenizer
    face_enc: tok.BSQVAE  # frozen face encoder
    global_enc: nn.Module | None  # frozen global encoder of v_g (the judge's, CLIP) or None (lowfreq)
    text_enc: nn.Module  # T5 encoder (trained with the tiny preset)
    caption_tokenizer: object  # caption tokenizer
    hear: hear_model.HEARTransformer  # the raw transformer (saved, sampled)
    model: TextToBits  # text encoder + transformer
    forward: object  # model, wrapped by DDP when distributed (its blocks compiled in place with --compile)
    ddp: nn.Module | None  # the DDP wrapper (its gradient sync is switched per micro-step)
    ema: nn.Module | None  # EMA copy of the transformer
    opt: torch.optim.Optimizer
    faults: Faults  # non-finite losses, signals, lost ranks (checkpoint.py)
    step: int = 0
    latents: dict = dataclasses.field(default_factory=dict)  # feature cache: record -> (d, h, w) latent
    faces: dict = dataclasses.field(default_factory=dict)  # feature cache: record -> (v_g, v_hf)
    boxes: dict = dataclasses.field(default_factory=dict)  # record -> its face box (4,), fractions of width, height


def param_groups(module, weight_decay, hear_lr_mult=1.0):
    """AdamW groups (paper: wd 0.01): decay on weight matrices, none on 1-D tensors, embeddings, norms and learned
    tokens (`plain`); HEAR's new parameters, far from where they end, learn at hear_lr_mult x the lr (lr_mult)."""
    groups, plain = {}, ("embed", "shared", "norm", "cfg_uncond", "pos_start", "ada_gss")
    for n, p in module.named_parameters():
        if p.requires_grad:
            wd = 0.0 if p.dim() < 2 or any(s in n for s in plain) else weight_decay
            mult = hear_lr_mult if any(m in n for m in hear_model.HEAR_PARAM_MARKERS) else 1.0
            groups.setdefault((wd, mult), []).append(p)
    return [{"params": ps, "weight_decay": wd, "lr_mult": mult} for (wd, mult), ps in groups.items()]


def read_text_init(cfg):
    """The --text_init checkpoint of train_text_encoder.py (or None): a pretrained tiny T5 and its vocabulary."""
    if not cfg.text_init:
        return None
    if cfg.text_encoder != "tiny":
        raise UserError(f"--text_init is for the tiny T5; --text_encoder={cfg.text_encoder} brings its own weights")
    if not os.path.isfile(cfg.text_init):
        raise UserError(f"--text_init={cfg.text_init}: not found; make it with python train_text_encoder.py "
                        "(or pass --text_init= to train the text encoder from nothing)")
    ckpt = load_checkpoint(cfg.text_init)
    if "text_encoder" not in ckpt or "head" not in ckpt:
        raise UserError(f"--text_init={cfg.text_init}: not a train_text_encoder.py checkpoint")
    return ckpt


def build_model(cfg, vae, face_enc, global_enc, resumed, master, records):
    """-> (text encoder, caption tokenizer, HEAR transformer, text trainable?): resumed, new, official weights, or a
    base (init_from=<a train.py checkpoint>: its transformer as official weights are loaded, and its text encoder)."""
    base = None if cfg.init_from in ("scratch", "resume") or cfg.init_from.startswith("infinity:") else cfg.init_from
    base_ckpt = load_checkpoint(base) if base else None
    if base and "model_config" not in base_ckpt:
        raise UserError(f"--init_from={base}: not a train.py checkpoint (no model_config); pass a base model's ckpt.pt")
    text_ckpt = read_text_init(cfg) if resumed is None and base is None else None  # a base brings its own
    vocab = (resumed or base_ckpt or text_ckpt or {}).get("caption_tokenizer")
    if cfg.text_encoder == "tiny" and vocab is None:
        vocab = read_vocab(cfg.data_dir)
    text_cfg = (resumed or base_ckpt or text_ckpt or {"config": vars(cfg)})["config"]  # its sizes win over the CLI's
    text_enc, caption_tokenizer, tiny = build_text_encoder(cfg.text_encoder, vocab, text_cfg["text_channels"],
                                                           text_cfg["text_layers"], text_cfg["text_heads"])
    sources = ((base, base_ckpt), (cfg.text_init, text_ckpt), (os.path.join(cfg.out_dir, "ckpt.pt"), resumed))
    for source, ckpt in sources:
        if tiny and ckpt is not None:  # at most one of the three is set
            load_strict(text_enc, ckpt["text_encoder"], source)
    train_text = tiny and cfg.train_text
    if tiny and not train_text:
        text_enc.requires_grad_(False)
    if resumed is not None:  # the architecture comes from the checkpoint
        hear = hear_model.HEARTransformer(hear_model.ModelConfig(**resumed["model_config"]))
        load_strict(hear, resumed["model"], os.path.join(cfg.out_dir, "ckpt.pt"))
    else:
        global_dim = face_enc.cfg.codebook_dim if global_enc is None else global_enc.dim
        official = cfg.init_from.removeprefix("infinity:") if cfg.init_from.startswith("infinity:") else None
        start = None  # face_global_proj's (weight, bias), or random
        if cfg.global_init == "looks" and cfg.use_global_face:
            start = looks_init(records, text_enc, caption_tokenizer, global_enc, cfg.face_size, cfg.crop_scale,
                               cfg.text_maxlen)
        hear, report = build_hear(cfg, text_enc.config.d_model, vae.cfg.codebook_dim, face_enc.cfg.codebook_dim,
                                  global_dim, base_ckpt or official, start)  # a base: the dict read above
        if start is not None:
            log(f"{hear.cfg.global_face_tokens} global face tokens start as the looks' words", cfg.out_dir, master)
        if report is not None:
            log(f"loaded {len(report['loaded'])} official tensors; newly initialized (HEAR-only): "
                f"{len(report['newly_initialized'])} tensors", cfg.out_dir, master)
    if hear.cfg.codebook_dim != vae.cfg.codebook_dim:
        raise UserError(f"transformer predicts {hear.cfg.codebook_dim} bits but the tokenizer has d = "
                        f"{vae.cfg.codebook_dim}; use the tokenizer the transformer was trained with")
    if cfg.train_params != "all":
        trainable = hear.set_trainable(cfg.train_params)
        text_enc.requires_grad_(False)
        train_text = False
        log(f"train_params={cfg.train_params}: training {len(trainable)} tensors", cfg.out_dir, master)
    return text_enc, caption_tokenizer, hear, train_text


def build_state(cfg, dist):
    """Data, frozen encoders, model, optimizer and (init_from=resume) the saved state -> TrainState."""
    records = read_manifest(cfg.data_dir, "train")
    vae, face_enc = (load_tokenizer(p)[0].to(dist.device) for p in (cfg.tokenizer_ckpt, cfg.face_encoder_ckpt))
    fe.face_schedule(cfg.face_size, face_enc.cfg.patch_size, cfg.hf_first_scale)  # a bad hf_first_scale fails now
    global_enc = fe.build_global_encoder(cfg.global_face, dist.device) if cfg.use_global_face else None
    resumed = load_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt")) if cfg.init_from == "resume" else None
    text_enc, caption_tokenizer, hear, train_text = build_model(cfg, vae, face_enc, global_enc, resumed, dist.master,
                                                                 records)
    model = TextToBits(text_enc, hear, train_text).to(dist.device).train()
    ema = copy.deepcopy(hear).requires_grad_(False) if cfg.ema_decay > 0 else None
    mult = resumed["config"].get("hear_lr_mult", 1.0) if resumed else cfg.hear_lr_mult  # a resumed run keeps its own
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay, mult), lr=cfg.learning_rate, betas=(0.9, cfg.beta2),
                            fused=dist.device.startswith("cuda"))
    if resumed is not None:
        opt.load_state_dict(resumed["optimizer"])
        if ema is not None and resumed.get("ema"):
            ema.load_state_dict(resumed["ema"])
    ddp = None if dist.world_size == 1 else nn.parallel.DistributedDataParallel(
        model, device_ids=[dist.local_rank] if "cuda" in dist.device else None)
    if cfg.compile:  # per block (model.compile_blocks): compiles faster than the whole model, steps nearly as fast
        hear.compile_blocks()
    forward = ddp or model
    faults = Faults(cfg.nan_policy, dist, cfg.out_dir)
    faults.skipped = resumed.get("skipped_steps", 0) if resumed else 0
    return TrainState(dist, records, aspect_buckets(records, cfg.pn), identity_pools(records), vae, face_enc,
                      global_enc, text_enc, caption_tokenizer, hear, model, forward, ddp, ema, opt, faults,
                      resumed["step"] if resumed else 0)


# -----------------------------------------------------------------------------
# Frozen features: each image is encoded once per use (or once per run with the cache), always in fp32


@torch.no_grad()
def target_latents(state, cfg, indices, template):
    """Frozen tokenizer latents (B, d, h, w) of the target images, at their aspect bucket's size. Their face boxes go
    to state.boxes as fractions of the width and height (the bucket stretches the image, and the box with it)."""
    todo = [i for i in indices if i not in state.latents]
    if todo:
        size, _, _ = geometry(cfg.pn, cfg.image_size, template, state.vae.cfg.patch_size)
        examples = [load_example(state.records[i], size) for i in todo]  # (image (3, H, W), box (4,) in its pixels)
        state.boxes.update((i, box / torch.tensor([size[1], size[0]] * 2)) for i, (_, box) in zip(todo, examples))
        x = torch.stack([image for image, _ in examples]).to(state.dist.device)
        with torch.autocast(x.device.type, enabled=False):  # fp32, as the official code encodes
            state.latents.update(zip(todo, state.vae.encode(x)))
    out = torch.stack([state.latents[i] for i in indices])
    if not cfg.cache_features:
        state.latents.clear()
    return out


@torch.no_grad()
def reference_tokens(state, cfg, indices):
    """Face tokens (v_g (B, N_g, D_g) or None, v_hf (B, N_hf, d) or None) of the reference records' own face crops."""
    todo = [i for i in dict.fromkeys(indices) if i not in state.faces]
    if todo:
        crops = torch.stack([load_face_crop(state.records[i], cfg.face_size, cfg.crop_scale) for i in todo])
        v_g, v_hf = face_conditions(state.hear, state.face_enc, state.global_enc, crops.to(state.dist.device),
                                    cfg.hf_first_scale)  # Eq. (3)-(5) inputs, fp32
        for j, i in enumerate(todo):
            state.faces[i] = (None if v_g is None else v_g[j], None if v_hf is None else v_hf[j])
    out = [state.faces[i] for i in indices]
    if not cfg.cache_features:
        state.faces.clear()
    return tuple(None if out[0][k] is None else torch.stack([o[k] for o in out]) for k in range(2))


def face_token_weights(boxes, schedule, token_weights, alpha):
    """Token weights (B, L) that carry the face mask of Eq. (2) to the bitwise loss: token_weights (L,) times alpha on
    the tokens of every scale whose cell centre lies in the target's face box (face_encoder.face_mask on that scale's
    grid), each row renormalised to sum to 1; alpha = 1 returns token_weights itself. boxes (B, 4): [x0, y0, x1, y1]
    as fractions of the width and height (state.boxes)."""
    if alpha == 1:
        return token_weights
    # Eq. (2) [HEAR] on the tokens. NOTE: differs from [HEAR], which weighs the face box only in the face encoder's
    # pixel losses; the transformer's loss weighs every token alike there (alpha = 1, the default and the paper presets)
    masks = [fe.face_mask(boxes * torch.tensor([w, h, w, h]), h, w, alpha).flatten(1) for h, w in schedule]
    weights = token_weights * torch.cat(masks, 1).to(token_weights.device)  # (B, L)
    return weights / weights.sum(1, keepdim=True)


def fill_cache(state, cfg):
    """Encode every training image and face once, in a fixed order, so a resumed run sees the same numbers. 16 images
    a chunk: a CPU encodes them 1.8x faster per image than 64 (they stay in its cache; docs/performance.md)."""
    chunks = [(t, idx[i: i + 16]) for t, idx in state.buckets.items() for i in range(0, len(idx), 16)]
    for template, chunk in tqdm(chunks, disable=not state.dist.master, desc="caching frozen features (16 images each)"):
        target_latents(state, cfg, chunk, template)
        reference_tokens(state, cfg, chunk)


# -----------------------------------------------------------------------------
# One optimizer step


def bit_accuracy(logits, labels, schedule):
    """Bit accuracy (3,) of the coarse / middle / fine thirds of the scales. logits (B, L, 2d), labels (B, L, d)."""
    hit = (logits.float().view(*labels.shape, 2).argmax(-1) == labels).float().mean((0, 2))  # (L,)
    offs, K = tok.token_offsets(schedule), len(schedule)
    return torch.stack([hit[offs[a]: offs[b]].mean() for a, b in ((0, K // 3), (K // 3, 2 * K // 3), (2 * K // 3, K))])


def train_step(state, cfg, batch, template):
    """One optimizer step on the global batch `batch` (record indices of one bucket) -> (loss, bit accuracy (3,),
    image tokens seen, (padded text length, global face tokens, high-frequency face tokens): the cross-attention keys
    of the last micro-batch), or None for a step whose non-finite loss was skipped (nan_policy=skip)."""
    dist, step, micro = state.dist, state.step, cfg.batch_size // (state.dist.world_size * cfg.grad_accum)
    _, schedule, grid = geometry(cfg.pn, cfg.image_size, template, state.vae.cfg.patch_size)
    token_weights = hear_model.scale_loss_weights(schedule, cfg.reweight_by_scale).to(dist.device)  # (L,)
    # per-sample randomness of the GLOBAL batch comes from (seed, step): identical for any world size
    g = seeded_generator(cfg.seed, step)
    use_short, drop, ref_u, person = (torch.rand(cfg.batch_size, generator=g) for _ in range(4))
    use_short, drop, person = (use_short < cfg.short_caption_prob, drop < cfg.cond_drop_prob,
                               person < cfg.person_caption_prob)
    bsc_gen = seeded_generator(cfg.seed, step, dist.rank, device=dist.device)  # Eq. (11) flips, per rank
    # the global RNG (stochastic depth masks) restarts each step from (seed, step, rank), a stream of its own (the
    # trailing 1; seeded_generator's hash): ranks draw different masks, and a resumed run, at any world size, draws
    # what an uninterrupted one would, with no RNG state in the checkpoint
    torch.manual_seed(hash((cfg.seed, step, dist.rank, 1)) % 2**63)
    for group in state.opt.param_groups:
        group["lr"] = group.get("lr_mult", 1.0) * lr_schedule(step, cfg.learning_rate, cfg.warmup_iters, cfg.max_iters,
                                                     cfg.min_lr_ratio, cfg.cosine_decay)
    loss_sum, tokens = 0.0, 0
    for m in range(cfg.grad_accum):
        lo = (m * dist.world_size + dist.rank) * micro  # position of this micro-batch in the global batch
        idx = batch[lo: lo + micro]
        x_in, labels = tok.bitwise_self_correction(target_latents(state, cfg, idx, template), schedule, cfg.bsc_p_max,
                                                   bsc_gen)  # Eq. (11)-(12)
        refs = pick_references(state.records, state.pools, idx, ref_u[lo: lo + micro], cfg.self_ref_prob)
        v_g, v_hf = reference_tokens(state, cfg, refs)
        texts = [caption(state.records[i], use_short[lo + j], person[lo + j]) for j, i in enumerate(idx)]
        ids = state.caption_tokenizer(texts, padding=True, truncation=True, max_length=cfg.text_maxlen,
                                      return_tensors="pt")
        if state.ddp is not None:  # sync gradients on the last micro-step only
            state.ddp.require_backward_grad_sync = m == cfg.grad_accum - 1
        input_ids, text_mask = ids["input_ids"].to(dist.device), ids["attention_mask"].to(dist.device)  # (B, T)
        with autocast(dist.device, cfg.dtype):
            logits = state.forward(input_ids, text_mask, x_in, schedule, grid, v_g, v_hf,
                                   drop[lo: lo + micro].to(dist.device))
        boxes = torch.stack([state.boxes[i] for i in idx])  # (B, 4), filled by target_latents above
        weights = face_token_weights(boxes, schedule, token_weights, cfg.face_loss_weight)  # (L,) or (B, L)
        loss = poison(hear_model.bitwise_loss(logits, labels, weights), step + 1)
        (loss / cfg.grad_accum).backward()
        loss_sum, tokens = loss_sum + loss.item() / cfg.grad_accum, tokens + labels.shape[0] * labels.shape[1]
    state.step += 1
    if state.faults.skip(loss_sum, state.step):  # every rank agrees; NaN gradients never reach the weights
        state.opt.zero_grad(set_to_none=True)
        return None
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(state.model.parameters(), cfg.grad_clip)
    state.opt.step()
    state.opt.zero_grad(set_to_none=True)
    if state.ema is not None:
        for pe, pm in zip(state.ema.parameters(), state.hear.parameters()):
            pe.lerp_(pm.detach(), 1 - cfg.ema_decay)
    keys = (ids["input_ids"].shape[1], *(0 if v is None else v.shape[1] for v in (v_g, v_hf)))
    return loss_sum, bit_accuracy(logits, labels, schedule), tokens, keys  # of the last micro-batch (argmax: no graph)


def save(state, cfg):
    """Atomic checkpoint with everything resume and sampling need; only rank 0 writes."""
    if not state.dist.master:
        return
    tiny = cfg.text_encoder == "tiny"  # a jointly trained text encoder is saved; a frozen flan-t5 is read from disk
    save_checkpoint({"model": state.hear.state_dict(), "ema": state.ema.state_dict() if state.ema is not None else None,
                     "text_encoder": state.text_enc.state_dict() if tiny else None,
                     "caption_tokenizer": state.caption_tokenizer.backend_tokenizer.to_str() if tiny else None,
                     "optimizer": state.opt.state_dict(), "model_config": dataclasses.asdict(state.hear.cfg),
                     "config": dataclasses.asdict(cfg), "step": state.step, "skipped_steps": state.faults.skipped},
                    os.path.join(cfg.out_dir, "ckpt.pt"))


# -----------------------------------------------------------------------------
# Training


def main(cfg):
    cfg = dataclasses.replace(cfg, init_from=init_after_restart(cfg.init_from, cfg.out_dir))
    dist = setup_device(cfg.device, cfg.dist_timeout_s)
    for flag in ("face_loss_weight", "hear_lr_mult"):  # 1: every token alike, every weight at one rate (the paper's)
        if getattr(cfg, flag) <= 0:
            raise UserError(f"--{flag}={getattr(cfg, flag)} must be > 0 (1: as the paper)")
    if cfg.global_init not in ("random", "looks"):
        raise UserError(f"--global_init={cfg.global_init}: choose random or looks")
    if cfg.batch_size % (dist.world_size * cfg.grad_accum):
        raise UserError(f"--batch_size={cfg.batch_size} must divide by world_size x grad_accum "
                        f"({dist.world_size} x {cfg.grad_accum})")
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    if dist.master:
        log(save_config(cfg, cfg.out_dir), cfg.out_dir)
        log(run_info(dist.device), cfg.out_dir)
    state = build_state(cfg, dist)  # each step reseeds its randomness (train_step)
    log(f"HEAR transformer {state.hear.num_params() / 1e6:.2f}M params ({state.hear.num_params(True) / 1e6:.2f}M "
        f"trainable), text encoder {sum(p.numel() for p in state.text_enc.parameters()) / 1e6:.2f}M "
        f"({'trained' if state.model.train_text else 'frozen'}), {len(state.records)} training images",
        cfg.out_dir, dist.master)
    if cfg.cache_features:
        fill_cache(state, cfg)
    history = train_loop(state, cfg)
    if dist.world_size > 1:
        torch.distributed.destroy_process_group()
    return history


def train_loop(state, cfg):
    """Steps from state.step to max_iters, with log lines, checkpoints and the faults of checkpoint.Faults."""
    buckets, template_of = list(state.buckets.values()), {i: t for t, idx in state.buckets.items() for i in idx}
    per_epoch = len(epoch_batches(len(state.records), cfg.batch_size, 0, cfg.seed, buckets))
    history, window, t0 = [], [], time.time()
    if state.step > 0:
        log(f"resumed from step {state.step}", cfg.out_dir, state.dist.master)
    bar = tqdm(total=cfg.max_iters, initial=state.step, disable=not state.dist.master, desc="train")
    with bar, state.faults as faults:  # the bar closes before an error line is printed
        while state.step < cfg.max_iters:
            # the data position is the step itself: resume needs no sampler state
            batch = epoch_batches(len(state.records), cfg.batch_size, state.step // per_epoch, cfg.seed,
                                  buckets)[state.step % per_epoch]
            out = train_step(state, cfg, batch, template_of[batch[0]])
            if out is not None:  # None: a non-finite step skipped (nan_policy=skip)
                window.append(out)
            bar.update(1)
            if window and (state.step % cfg.log_interval == 0 or state.step == cfg.max_iters):
                history.append(log_window(state, cfg, window, time.time() - t0, template_of[batch[0]]))
                window, t0 = [], time.time()
            if state.step % cfg.save_interval == 0 or state.step == cfg.max_iters or faults.signum:
                save(state, cfg)
            faults.exit_if_signalled(state.step)
    return history


def log_window(state, cfg, window, seconds, template):
    """One log line (and a metrics.jsonl row) for the steps since the last one: loss, bit accuracy, tok/s, MFU."""
    tok_s = sum(w[2] for w in window) * state.dist.world_size / seconds
    _, schedule, _ = geometry(cfg.pn, cfg.image_size, template, state.vae.cfg.patch_size)
    peak = peak_flops(state.dist.device)
    flops = state.hear.estimate_flops_per_token(schedule, *window[-1][3])  # text, global and hf face keys
    mfu = f"{100 * flops * tok_s / (peak * state.dist.world_size):.1f}%" if peak else "n/a"
    row = {"step": state.step, "loss": sum(w[0] for w in window) / len(window), "tok_s": tok_s,
           "acc": (sum(w[1] for w in window) / len(window)).tolist(), "skipped": state.faults.skipped}
    acc = "/".join(f"{a:.3f}" for a in row["acc"])
    log(f"step {state.step}/{cfg.max_iters} | loss {row['loss']:.4f} | bit acc coarse/mid/fine {acc} | "
        f"lr {state.opt.param_groups[0]['lr']:.2e} | {tok_s:.0f} tok/s | MFU {mfu}", cfg.out_dir, state.dist.master)
    if state.dist.master:
        with open(os.path.join(cfg.out_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")
    return row


if __name__ == "__main__":
    cli(main, Config, PRESETS)
