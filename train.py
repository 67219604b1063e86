"""
Train HEAR (or plain Infinity-style text-to-image) with bitwise self-correction.

  CPU, synthfaces:   python train.py --preset=synthfaces
  resume:            python train.py --preset=synthfaces --init_from=resume
  DDP (CPU, gloo):   torchrun --standalone --nproc_per_node=2 train.py --preset=synthfaces --device=cpu
  paper recipe:      torchrun --standalone --nproc_per_node=8 train.py --preset=infinity_2b --data_dir=data/faces

Per step: frozen tokenizer features -> bitwise self-correction (Eq. 11-12) -> teacher-forced next-scale logits
(Eq. 8) conditioned on the caption (short or long, p = 0.5), the global face tokens (Eq. 3-4) and the
high-frequency face tokens (Eq. 5-7) -> bitwise cross-entropy. Conditions are dropped together with p = 0.1 for CFG.

The manifest format is defined in data/manifest.py.
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
from data.manifest import aspect_buckets, epoch_batches, geometry, load_example, load_image, read_manifest
from common import (UserError, autocast, cli, load_checkpoint, log, lr_schedule, peak_flops, rng_state, run_info,
                    save_checkpoint, save_config, set_rng_state, setup_device)

# -----------------------------------------------------------------------------
# Config


@dataclasses.dataclass
class Config:
    preset: str = "synthfaces"  # preset name (recorded in the checkpoint)
    data_dir: str = "data/synthfaces/out"  # folder (or file) of the JSONL manifest (format above)
    out_dir: str = "out/hear"  # checkpoints, config.json, log.txt, metrics.jsonl
    init_from: str = "scratch"  # scratch | resume | infinity:<official infinity_2b_reg.pth>
    tokenizer_ckpt: str = "out/tokenizer/ckpt.pt"  # frozen generation tokenizer: our ckpt or infinity:<vae .pth>
    face_encoder_ckpt: str = "out/face_encoder/ckpt.pt"  # frozen face encoder (train_tokenizer.py --face_loss=True)
    # transformer (ignored with init_from=infinity:..., where the weights fix the sizes)
    depth: int = 4  # blocks
    embed_dim: int = 128  # C
    num_heads: int = 4  # heads (head_dim multiple of 4)
    mlp_ratio: float = 4.0  # FFN width ratio
    text_maxlen: int = 80  # longest caption in tokens (rows of the learned null caption)
    drop_path_rate: float = 0.0  # stochastic depth
    # text encoder
    text_encoder: str = "tiny"  # tiny (T5 encoder trained jointly, vocab <data_dir>/tokenizer.json) | <flan-t5 folder>
    text_channels: int = 128  # Ct of the tiny T5 (>= 128)
    text_layers: int = 2  # tiny T5 layers
    text_heads: int = 4  # tiny T5 heads
    # HEAR
    use_global_face: bool = True  # Eq. (3)-(4): global face tokens join the text in cross-attention
    use_hf_adapter: bool = True  # Eq. (5)-(7): decoupled high-frequency cross-attention
    hf_first_scale: int = 3  # FT = tokens of the first hf_first_scale face scales (paper: 6 of 13)
    global_face: str = "lowfreq"  # lowfreq: v[:FT] of the face encoder | clip:<CLIPVisionModelWithProjection folder>
    train_params: str = "all"  # all | adapter (HEAR's new params + cross-attn W_Q, W_K, W_V + W_g) | hear (new only)
    # data
    image_size: int = 64  # square training size when pn == ""
    pn: str = ""  # official pixel budget 0.06M | 0.25M | 0.60M | 1M: aspect buckets from the templates
    face_size: int = 64  # reference face crop size for the face encoder
    short_caption_prob: float = 0.5  # P(short caption) (paper: 0.5)
    cache_features: bool = True  # keep frozen tokenizer features / face tokens in memory (small datasets)
    # optimisation (paper: AdamW lr 1e-4, wd 0.01)
    batch_size: int = 32  # global batch in images (over ranks and accumulation steps)
    grad_accum: int = 1  # micro-steps per optimizer step
    max_iters: int = 1000  # optimizer steps (the synthfaces default fits 10 CPU minutes)
    learning_rate: float = 1e-3  # AdamW lr (after warmup, constant as in the paper)
    warmup_iters: int = 100  # linear warmup
    weight_decay: float = 0.01  # AdamW wd (no decay on norms, biases, embeddings, gains)
    beta2: float = 0.97  # AdamW beta2 (Infinity 0.97)
    grad_clip: float = 1.0  # grad-norm clip (0 = off)
    bsc_p_max: float = 0.3  # bitwise self-correction: flip rate drawn from {0, 0.01, ..., p_max} per scale
    reweight_by_scale: bool = True  # token weights proportional to sqrt(area_K / area_k) (official intent)
    cond_drop_prob: float = 0.1  # P(drop text and face together) for classifier-free guidance
    ema_decay: float = 0.0  # EMA of the transformer weights (0 = off); sample/eval use it when present
    grad_checkpointing: bool = False  # recompute blocks in backward (2B at 1024 px needs it)
    # runtime
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "bfloat16"  # CUDA autocast dtype
    compile: bool = False  # torch.compile the model
    seed: int = 0  # init, data order, randomness (+ rank)
    log_interval: int = 25  # steps between log lines
    save_interval: int = 500  # steps between checkpoints (and at the end)


PRESETS = {
    "synthfaces": {},
    "infinity_2b": {"init_from": "infinity:weights/infinity_2b_reg.pth", "out_dir": "out/hear_2b",
                    "tokenizer_ckpt": "infinity:weights/infinity_vae_d32reg.pth",
                    "face_encoder_ckpt": "out/face_encoder_2b/ckpt.pt", "text_encoder": "weights/flan-t5-xl",
                    "text_maxlen": 512, "pn": "1M", "face_size": 1024, "hf_first_scale": 6,
                    "global_face": "clip:weights/clip-vit-large-patch14", "batch_size": 64, "max_iters": 500000,
                    "learning_rate": 1e-4, "warmup_iters": 0, "drop_path_rate": 0.1, "cache_features": False,
                    "grad_checkpointing": True, "compile": True, "ema_decay": 0.9999, "log_interval": 100,
                    "save_interval": 5000},
    "tiny": {"depth": 2, "embed_dim": 64, "num_heads": 4, "image_size": 16, "face_size": 16, "hf_first_scale": 2,
             "batch_size": 4, "max_iters": 4, "warmup_iters": 1, "log_interval": 1, "save_interval": 2,
             "text_layers": 1, "text_heads": 2},
}


# -----------------------------------------------------------------------------
# Frozen encoders and the trainable text-to-bits module


def load_tokenizer(spec):
    """Frozen tokenizer from `infinity:<official .pth>` or a train_tokenizer.py checkpoint -> (BSQVAE, ckpt or None)."""
    if spec.startswith("infinity:"):
        return tok.load_infinity_vae(spec.split(":", 1)[1]).eval().requires_grad_(False), None
    ckpt = load_checkpoint(spec)
    if "tokenizer_config" not in ckpt:
        raise UserError(f"{spec} is not a train_tokenizer.py checkpoint (no tokenizer_config)")
    vae = tok.BSQVAE(tok.TokenizerConfig(**ckpt["tokenizer_config"]))
    vae.load_state_dict(ckpt["model"])
    return vae.eval().requires_grad_(False), ckpt


def build_text_encoder(cfg, caption_tokenizer_json=None):
    """-> (T5 encoder, caption tokenizer, trainable?). tiny: built from config with the synthfaces vocabulary;
    otherwise a local flan-t5 folder, frozen."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast, T5Config, T5EncoderModel

    if cfg.text_encoder != "tiny":
        if not os.path.isdir(cfg.text_encoder):
            raise UserError(f"--text_encoder={cfg.text_encoder!r}: not a local T5 folder (e.g. weights/flan-t5-xl)")
        t5 = T5EncoderModel.from_pretrained(cfg.text_encoder, local_files_only=True)
        captions = AutoTokenizer.from_pretrained(cfg.text_encoder, local_files_only=True)
        return t5.eval().requires_grad_(False), captions, False
    if caption_tokenizer_json is None:
        path = os.path.join(cfg.data_dir if os.path.isdir(cfg.data_dir) else os.path.dirname(cfg.data_dir),
                            "tokenizer.json")
        if not os.path.isfile(path):
            raise UserError(f"{path} not found: the tiny text encoder needs the caption vocabulary of prepare.py")
        caption_tokenizer_json = open(path).read()
    from tokenizers import Tokenizer

    captions = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(caption_tokenizer_json),
                                       pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    t5_cfg = T5Config(vocab_size=len(captions), d_model=cfg.text_channels, d_kv=cfg.text_channels // cfg.text_heads,
                      d_ff=2 * cfg.text_channels, num_layers=cfg.text_layers, num_heads=cfg.text_heads,
                      dropout_rate=0.0, pad_token_id=0, eos_token_id=1)
    return T5EncoderModel(t5_cfg), captions, True


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


def build_hear(cfg, text_channels, d, face_dim, global_dim):
    """New or official-initialised HEAR transformer -> (model, load report or None)."""
    hear_cfg = dict(use_global_face=cfg.use_global_face, global_face_dim=global_dim, use_hf_adapter=cfg.use_hf_adapter,
                    hf_face_dim=face_dim, grad_checkpointing=cfg.grad_checkpointing, drop_path_rate=cfg.drop_path_rate)
    if cfg.init_from.startswith("infinity:"):
        return hear_model.load_infinity(cfg.init_from.split(":", 1)[1], **hear_cfg)
    mcfg = hear_model.ModelConfig(depth=cfg.depth, embed_dim=cfg.embed_dim, num_heads=cfg.num_heads,
                                  mlp_ratio=cfg.mlp_ratio, codebook_dim=d, text_channels=text_channels,
                                  text_maxlen=cfg.text_maxlen, **hear_cfg)
    return hear_model.HEARTransformer(mcfg), None


def face_features(face_enc, global_enc, crops, cfg):
    """Reference crops (B, 3, S, S) -> (global tokens (B, N_g, D_g) or None, high-frequency tokens (B, N_hf, d))."""
    side = cfg.face_size // face_enc.cfg.patch_size
    _, v_low, v_hf = fe.face_tokens(face_enc, crops, tok.small_schedule(side, side), cfg.hf_first_scale)  # Eq. (5)
    v_g = v_low if global_enc is None else global_enc(crops)
    return (v_g if cfg.use_global_face else None), (v_hf if cfg.use_hf_adapter else None)


def build_global_encoder(cfg, device="cpu"):
    """None for the synthfaces preset (v[:FT] is the global view), else a frozen CLIP vision tower on `device`."""
    if cfg.global_face == "lowfreq":
        return None
    from transformers import CLIPVisionModelWithProjection

    path = cfg.global_face.removeprefix("clip:")
    if not os.path.isdir(path):
        raise UserError(f"--global_face={cfg.global_face!r}: {path} is not a local CLIP vision folder")
    return fe.ClipGlobalEncoder(CLIPVisionModelWithProjection.from_pretrained(path, local_files_only=True)).to(device)


def param_groups(module, weight_decay):
    """AdamW groups: decay on matrices, none on norms, biases, embeddings and gains (paper: wd 0.01)."""
    decay, no_decay = [], []
    for n, p in module.named_parameters():
        if not p.requires_grad:
            continue
        plain = p.dim() < 2 or "embed" in n or "norm" in n or "cfg_uncond" in n or "pos_start" in n or "ada_gss" in n
        (no_decay if plain else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# -----------------------------------------------------------------------------
# Training


def main(cfg):
    dist = setup_device(cfg.device)
    device, master = dist.device, dist.master
    if cfg.batch_size % (dist.world_size * cfg.grad_accum):
        raise UserError(f"--batch_size={cfg.batch_size} must divide by world_size x grad_accum "
                        f"({dist.world_size} x {cfg.grad_accum})")
    micro = cfg.batch_size // (dist.world_size * cfg.grad_accum)  # images per rank per micro-step
    torch.manual_seed(cfg.seed + dist.rank)
    if master:
        log(save_config(cfg, cfg.out_dir), cfg.out_dir)
        log(run_info(device), cfg.out_dir)
    records = read_manifest(cfg.data_dir, "train")
    vae, face_enc = (load_tokenizer(p)[0].to(device) for p in (cfg.tokenizer_ckpt, cfg.face_encoder_ckpt))
    global_enc = build_global_encoder(cfg, device)
    global_dim = face_enc.cfg.codebook_dim if global_enc is None else global_enc.clip.config.projection_dim
    resumed = load_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt")) if cfg.init_from == "resume" else None
    text_enc, captions, train_text = build_text_encoder(cfg, resumed and resumed.get("caption_tokenizer"))
    if resumed is not None:  # the architecture comes from the checkpoint
        hear = hear_model.HEARTransformer(hear_model.ModelConfig(**resumed["model_config"]))
        hear.load_state_dict(resumed["model"])
        if train_text:
            text_enc.load_state_dict(resumed["text_encoder"])
    else:
        hear, report = build_hear(cfg, text_enc.config.d_model, vae.cfg.codebook_dim, face_enc.cfg.codebook_dim,
                                  global_dim)
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
    model = TextToBits(text_enc, hear, train_text).to(device).train()
    ema = copy.deepcopy(hear).requires_grad_(False) if cfg.ema_decay > 0 else None
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.learning_rate, betas=(0.9, cfg.beta2),
                            fused=device.startswith("cuda"))
    bsc_gen = torch.Generator(device=device)  # Eq. (11) flips; reseeded from (seed, rank, step) every step
    step = 0
    if resumed is not None:
        opt.load_state_dict(resumed["optimizer"])
        if ema is not None and resumed.get("ema"):
            ema.load_state_dict(resumed["ema"])
        set_rng_state(resumed["rng"])
        step = resumed["step"]
    ddp = None if dist.world_size == 1 else nn.parallel.DistributedDataParallel(
        model, device_ids=[dist.local_rank] if "cuda" in device else None)
    run = torch.compile(ddp or model) if cfg.compile else (ddp or model)  # `model` stays raw for saving/sampling
    log(f"HEAR transformer {hear.num_params() / 1e6:.2f}M params ({hear.num_params(True) / 1e6:.2f}M trainable), "
        f"text encoder {sum(p.numel() for p in text_enc.parameters()) / 1e6:.2f}M "
        f"({'trained' if train_text else 'frozen'})"
        f", {len(records)} training images", cfg.out_dir, master)

    buckets = aspect_buckets(records, cfg.pn)
    template_of = {i: t for t, idx in buckets.items() for i in idx}
    bucket_lists = list(buckets.values())
    by_identity = {}
    for i, r in enumerate(records):
        by_identity.setdefault(r.get("identity", i), []).append(i)
    cache = {}

    @torch.no_grad()
    def frozen_features(indices, template):
        """Frozen tokenizer features (B, d, h, w) and face tokens of the records' own face crops (cached)."""
        todo = [i for i in indices if i not in cache]
        if todo:
            size, _, _ = geometry(cfg.pn, cfg.image_size, template, vae.cfg.patch_size)
            ex = [load_example(records[i], size) for i in todo]
            x = torch.stack([e[0] for e in ex]).to(device)
            crops = torch.stack([load_image(records[i]["crop_path"], (cfg.face_size, cfg.face_size))
                                 if records[i].get("crop_path") else fe.square_crop(e[0], e[1], size=cfg.face_size)
                                 for i, e in zip(todo, ex)]).to(device)
            with autocast(device, cfg.dtype):
                feats = vae.encode(x).float()
                v_g, v_hf = face_features(face_enc, global_enc, crops, cfg)
            for j, i in enumerate(todo):
                cache[i] = tuple(None if t is None else t[j].float() for t in (feats, v_g, v_hf))
        out = [cache[i] for i in indices]
        if not cfg.cache_features:
            cache.clear()
        return [None if out[0][k] is None else torch.stack([o[k] for o in out]) for k in range(3)]

    if cfg.cache_features:  # fill the cache once, in a fixed order, so a resumed run sees the same numbers
        chunks = [(t, idx[i: i + 64]) for t, idx in buckets.items() for i in range(0, len(idx), 64)]
        for template, chunk in tqdm(chunks, disable=not master, desc="caching frozen features (64 images each)"):
            frozen_features(chunk, template)
    per_epoch, epoch, batches = len(epoch_batches(len(records), cfg.batch_size, 0, cfg.seed, bucket_lists)), -1, None
    history = []
    t0, tokens_seen, loss_acc, acc_acc, n_acc = time.time(), 0, 0.0, None, 0
    bar = tqdm(total=cfg.max_iters, initial=step, disable=not master, desc="train")
    while step < cfg.max_iters:
        if step // per_epoch != epoch:  # the data position is the step itself: resume needs no sampler state
            epoch = step // per_epoch
            batches = epoch_batches(len(records), cfg.batch_size, epoch, cfg.seed, bucket_lists)
        batch = batches[step % per_epoch]
        template = template_of[batch[0]]
        _, schedule, grid = geometry(cfg.pn, cfg.image_size, template, vae.cfg.patch_size)
        token_weights = hear_model.scale_loss_weights(schedule, cfg.reweight_by_scale).to(device)  # (L,), cheap
        # per-sample randomness of the GLOBAL batch from (seed, step): identical for any world size
        g = torch.Generator().manual_seed(cfg.seed * 1000003 + step)
        use_short = torch.rand(cfg.batch_size, generator=g) < cfg.short_caption_prob
        drop = torch.rand(cfg.batch_size, generator=g) < cfg.cond_drop_prob
        ref_pick = torch.rand(cfg.batch_size, generator=g)
        bsc_gen.manual_seed((cfg.seed * 1000003 + step) * 64 + dist.rank)
        lr = lr_schedule(step, cfg.learning_rate, cfg.warmup_iters, cfg.max_iters, cosine=False)
        for group in opt.param_groups:
            group["lr"] = lr
        for m in range(cfg.grad_accum):
            lo = (m * dist.world_size + dist.rank) * micro  # position of this micro-batch in the global batch
            idx = batch[lo: lo + micro]
            feats, _, _ = frozen_features(idx, template)
            # reference face: a random image of the same identity (the target itself only with probability 1/n), so
            # the model cannot simply copy the target's expression or accessories through the face tokens
            refs = []
            for j, i in enumerate(idx):
                pool = by_identity[records[i].get("identity", i)]
                refs.append(pool[int(ref_pick[lo + j] * len(pool))] if len(pool) > 1 else i)
            _, v_g, v_hf = frozen_features(refs, template)
            x_in, labels = tok.bitwise_self_correction(feats, schedule, cfg.bsc_p_max, bsc_gen)  # Eq. (11)-(12)
            texts = [records[i]["caption_short" if use_short[lo + j] else "caption_long"] for j, i in enumerate(idx)]
            ids = captions(texts, padding=True, truncation=True, max_length=cfg.text_maxlen, return_tensors="pt")
            if ddp is not None:  # sync gradients on the last micro-step only (set on DDP, not the compiled wrapper)
                ddp.require_backward_grad_sync = m == cfg.grad_accum - 1
            with autocast(device, cfg.dtype):
                logits = run(ids["input_ids"].to(device), ids["attention_mask"].to(device), x_in, schedule, grid,
                             v_g, v_hf, drop[lo: lo + micro].to(device))
            loss = hear_model.bitwise_loss(logits, labels, token_weights)
            (loss / cfg.grad_accum).backward()
            loss_acc += loss.item() / cfg.grad_accum
            tokens_seen += labels.shape[0] * labels.shape[1]
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ema is not None:
            with torch.no_grad():
                for pe, pm in zip(ema.parameters(), hear.parameters()):
                    pe.lerp_(pm, 1 - cfg.ema_decay)
        step += 1
        bar.update(1)
        # bit accuracy per scale group (coarse / middle / fine thirds of the schedule) on the last micro-batch
        with torch.no_grad():
            hit = (logits.float().view(*labels.shape, 2).argmax(-1) == labels).float().mean((0, 2))  # (L,)
            offs, K = tok.token_offsets(schedule), len(schedule)
            groups = [(0, K // 3), (K // 3, 2 * K // 3), (2 * K // 3, K)]
            acc = torch.stack([hit[offs[a]: offs[b]].mean() for a, b in groups])
            acc_acc = acc if acc_acc is None else acc_acc + acc
            n_acc += 1
        if step % cfg.log_interval == 0 or step == cfg.max_iters:
            dt = time.time() - t0
            tok_s = tokens_seen * dist.world_size / dt
            flops = hear.estimate_flops_per_token(schedule, text_len=ids["input_ids"].shape[1])
            peak = peak_flops(device)
            mfu = f"{100 * flops * tok_s / (peak * dist.world_size):.1f}%" if peak else "n/a"
            mean_loss, mean_acc = loss_acc / n_acc, (acc_acc / n_acc).tolist()
            log(f"step {step}/{cfg.max_iters} | loss {mean_loss:.4f} | bit acc coarse/mid/fine "
                f"{mean_acc[0]:.3f}/{mean_acc[1]:.3f}/{mean_acc[2]:.3f} | lr {lr:.2e} | {tok_s:.0f} tok/s | "
                f"MFU {mfu}", cfg.out_dir, master)
            history.append({"step": step, "loss": mean_loss, "acc": mean_acc, "tok_s": tok_s})
            if master:
                with open(os.path.join(cfg.out_dir, "metrics.jsonl"), "a") as f:
                    f.write(json.dumps(history[-1]) + "\n")
            t0, tokens_seen, loss_acc, acc_acc, n_acc = time.time(), 0, 0.0, None, 0
        if master and (step % cfg.save_interval == 0 or step == cfg.max_iters):
            save_checkpoint({"model": hear.state_dict(), "ema": ema.state_dict() if ema is not None else None,
                             "text_encoder": text_enc.state_dict() if cfg.text_encoder == "tiny" else cfg.text_encoder,
                             "caption_tokenizer": captions.backend_tokenizer.to_str() if cfg.text_encoder == "tiny"
                             else None, "optimizer": opt.state_dict(),
                             "model_config": dataclasses.asdict(hear.cfg), "config": dataclasses.asdict(cfg),
                             "step": step, "rng": rng_state()}, os.path.join(cfg.out_dir, "ckpt.pt"))
    bar.close()
    if dist.world_size > 1:
        torch.distributed.destroy_process_group()
    return history


if __name__ == "__main__":
    cli(main, Config, PRESETS)
