"""
Throughput / latency / MFU benchmark (not a test). Random weights and inputs at the sizes of a preset.

  python bench.py --preset=synthfaces                      # CPU, the synthfaces model
  python bench.py --preset=infinity_2b --pn=0.25M          # GPU, Infinity-2B + HEAR adapters at 512 px
  python bench.py --preset=infinity_2b --compile=True --what=sample

Prints one JSON line per measurement (and appends them to --out when set):
  train:  tokens/s and MFU of a full training step (forward, backward, AdamW) under the block-causal mask
  sample: seconds per image batch of KV-cached generation with CFG (the doubled batch), decoder excluded
  vae:    encoder and decoder images/s
"""

import dataclasses
import json
import time

import torch

import model as hear_model
import tokenizer as tok
from common import autocast, cli, peak_flops, resolve_device, run_info
from face_encoder import hf_split


@dataclasses.dataclass
class Config:
    preset: str = "synthfaces"  # preset name
    what: str = "train,sample,vae"  # comma-separated measurements
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "bfloat16"  # autocast dtype on CUDA
    compile: bool = False  # torch.compile the transformer (warm-up excluded from timing)
    batch_size: int = 8  # images per step
    image_size: int = 64  # square size when pn == ""
    pn: str = ""  # official pixel budget (0.06M, 0.25M, 1M) instead of image_size
    depth: int = 4  # transformer size (ignored by infinity_2b, which uses the official sizes)
    embed_dim: int = 128
    num_heads: int = 4
    text_channels: int = 128
    codebook_dim: int = 32  # d
    text_len: int = 32  # caption tokens
    face_size: int = 64  # reference face crop side: its token count fixes the face tokens (Eq. 5)
    hf_first_scale: int = 3  # FT = tokens of the first hf_first_scale face scales; the rest are v_hf (0 = no adapter)
    patch_size: int = 8  # tokenizer stride
    vae_base_ch: int = 32  # tokenizer width
    vae_ch_mult: tuple = (1, 1, 2, 2)
    grad_checkpointing: bool = False  # the 2B at 1024 px needs it
    warmup: int = 2  # untimed iterations
    iters: int = 5  # timed iterations
    out: str = ""  # optional JSONL file to append results to


PRESETS = {
    "synthfaces": {},
    "infinity_2b": {"pn": "1M", "batch_size": 4, "text_len": 64, "face_size": 1024, "hf_first_scale": 6,
                    "patch_size": 16, "vae_base_ch": 128, "vae_ch_mult": (1, 2, 4, 4, 4), "compile": True,
                    "grad_checkpointing": True},
}


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, cfg, device):
    """Mean seconds per call after cfg.warmup untimed calls."""
    for _ in range(cfg.warmup):
        fn()
    sync(device)
    t = time.perf_counter()
    for _ in range(cfg.iters):
        fn()
    sync(device)
    return (time.perf_counter() - t) / cfg.iters


def main(cfg):
    device = resolve_device(cfg.device)
    torch.manual_seed(0)
    results = []

    def report(**kv):
        kv = {"preset": cfg.preset, "device": run_info(device).split("device ")[-1], **kv}
        results.append(kv)
        print(json.dumps(kv), flush=True)

    schedule = tok.get_schedule(1.0, cfg.pn) if cfg.pn else tok.small_schedule(*[cfg.image_size // cfg.patch_size] * 2)
    grid = tok.rope_grid(1.0) if cfg.pn else schedule[-1]
    L, B = tok.token_offsets(schedule)[-1], cfg.batch_size
    sizes = hear_model.INFINITY_2B if cfg.preset == "infinity_2b" else dict(
        depth=cfg.depth, embed_dim=cfg.embed_dim, num_heads=cfg.num_heads, codebook_dim=cfg.codebook_dim,
        text_channels=cfg.text_channels, text_maxlen=max(64, cfg.text_len))
    face_schedule = tok.small_schedule(cfg.face_size // cfg.patch_size, cfg.face_size // cfg.patch_size)
    n_global = hf_split(face_schedule, cfg.hf_first_scale)  # FT: v_g = v[:FT] (the synthfaces global view)
    n_hf = tok.token_offsets(face_schedule)[-1] - n_global if cfg.hf_first_scale else 0  # v_hf = v[FT:], Eq. (5)
    mcfg = hear_model.ModelConfig(**sizes, use_global_face=True, global_face_dim=sizes["codebook_dim"],
                                  use_hf_adapter=n_hf > 0, hf_face_dim=sizes["codebook_dim"],
                                  grad_checkpointing=cfg.grad_checkpointing)
    d, Ct = mcfg.codebook_dim, mcfg.text_channels
    net = hear_model.HEARTransformer(mcfg).to(device)
    text = torch.randn(B, cfg.text_len, Ct, device=device)
    lens = torch.full((B,), cfg.text_len, device=device)
    v_g = torch.randn(B, n_global, d, device=device) * d**-0.5
    v_hf = torch.randn(B, n_hf, d, device=device) * d**-0.5 if n_hf else None
    fwd = torch.compile(net) if cfg.compile else net

    if "train" in cfg.what:
        x = torch.randn(B, L - 1, d, device=device) * d**-0.5
        bits = torch.randint(0, 2, (B, L, d), device=device)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=device.startswith("cuda"))

        def step():
            with autocast(device, cfg.dtype):
                logits = fwd(text, lens, x, schedule, grid, v_g, v_hf)
            hear_model.bitwise_loss(logits, bits).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        dt = timed(step, cfg, device)
        tok_s = B * L / dt
        flops = net.estimate_flops_per_token(schedule, cfg.text_len + n_global, n_hf)
        peak = peak_flops(device)
        mem = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
        report(what="train_step", params_M=round(net.num_params() / 1e6, 2), batch=B, tokens_per_image=L,
               step_s=round(dt, 4), tokens_per_s=round(tok_s), mfu=round(flops * tok_s / peak, 4) if peak else None,
               peak_mem_GiB=None if mem is None else round(mem, 2))
        del opt

    if "sample" in cfg.what:
        net.eval()

        def gen():
            with autocast(device, cfg.dtype):
                net.generate(text, lens, schedule, grid, cfg_scale=3.0, face_global=v_g, face_hf=v_hf,
                             generator=torch.Generator(device=device).manual_seed(0))

        dt = timed(gen, cfg, device)
        report(what="sample", batch=B, scales=len(schedule), s_per_batch=round(dt, 4), s_per_image=round(dt / B, 4))

    if "vae" in cfg.what:
        vae = tok.BSQVAE(tok.TokenizerConfig(cfg.vae_base_ch, cfg.vae_ch_mult, 2 if cfg.pn else 1, d,
                                             cfg.patch_size)).to(device).eval()
        H, W = schedule[-1][0] * cfg.patch_size, schedule[-1][1] * cfg.patch_size
        img = torch.rand(B, 3, H, W, device=device) * 2 - 1
        with torch.no_grad(), autocast(device, cfg.dtype):
            z = vae.encode(img)
            enc = timed(lambda: vae.encode(img), cfg, device)
            dec = timed(lambda: vae.decode(z), cfg, device)
        report(what="vae", batch=B, pixels=f"{H}x{W}", encode_img_per_s=round(B / enc, 1),
               decode_img_per_s=round(B / dec, 1))

    if cfg.out:
        with open(cfg.out, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in results)
    return results


if __name__ == "__main__":
    cli(main, Config, PRESETS)
