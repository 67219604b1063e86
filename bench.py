"""
Speed, peak memory and MFU at the sizes of a preset, random weights and inputs (a benchmark, not a test). Its CPU
figures at the quick-start sizes (docs/from_scratch.md, CPU efficiency), each on an idle machine, eager and compiled:
  python bench.py --what=train [--compile=True]                   # transformer step: tokens/s, cpu_mfu
  python bench.py --what=tokenizer --batch_size=16 [--compile=True]  # img/s, cpu_mfu
  python bench.py --what=recompute                      # KV cache vs recompute: ratio, token_limit 1.69x, of_limit
  python bench.py --what=recompute --pn=1M --batch_size=1         # the 13-scale 1M schedule: token_limit 2.57x
--profile=True adds each stage's per-op table; on a busy box, OMP_NUM_THREADS=1 with --clock=cpu is steadier.
GPU, one H100 / H200, under 10 minutes: bash tests/gpu/run.sh

Stdout: one JSON line per stage (--what) with its peak memory and load average; --profile tables go to stderr.
MFU: model FLOP/s (model.estimate_flops_per_token; for the tokenizer, one step's convolutions as FlopCounterMode
counts them) over the bf16 peak; on CPU (cpu_mfu) over 2048^2 fp32 matmuls timed in-process at the same threads.
"""

import dataclasses
import functools
import json
import os
import re
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.utils.flop_counter import FlopCounterMode

import face_encoder as fe
import face_loss as fl
import model as hear_model
import tokenizer as tok
from common import UserError, autocast, cli, resolve_device, run_info
from data.manifest import geometry
from metrics import peak_flops


@dataclasses.dataclass
class Config:
    preset: str = "synthfaces"  # preset name
    what: str = "train,tokenizer,sample,recompute"  # comma-separated stages (see above)
    device: str = "auto"  # auto | cpu | cuda
    compile: bool = False  # torch.compile each transformer block (train, sample), the VAE's encoder and decoder
    profile: bool = False  # print a torch.profiler per-op table of each timed stretch
    clock: str = "wall"  # wall | cpu: process CPU time (CPU only; at 1 thread the steadier figure on a busy box)
    batch_size: int = 32  # images per step / sampling call (the quick start: transformer 32, tokenizer 16)
    image_size: int = 64  # square size when pn == ""
    pn: str = ""  # official pixel budget (0.06M, 0.25M, 1M) instead of image_size
    depth: int = 4  # transformer blocks (infinity_2b: the official sizes; 4 heads and d 32 otherwise)
    embed_dim: int = 128  # transformer width C
    text_channels: int = 128  # width of the text features
    text_len: int = 32  # caption tokens
    face_size: int = 64  # reference face crop side: its token count fixes the face tokens (Eq. 5)
    hf_first_scale: int = 3  # FT = tokens of the first hf_first_scale face scales; the rest are v_hf
    patch_size: int = 8  # tokenizer stride
    vae_base_ch: int = 32  # tokenizer width
    vae_ch_mult: tuple = (1, 1, 2, 2)  # tokenizer channel multiplier per level
    vae_res_blocks: int = 1  # ResnetBlocks per encoder level (official d32: 2)
    t5_layers: int = 0  # sample: a random T5 encoder of the text width (24 at width 2048 = flan-t5-xl); 0 = none
    warmup: int = 2  # untimed iterations
    iters: int = 5  # timed iterations


PRESETS = {
    "synthfaces": {},  # the quick-start sizes: transformer depth 4, C 128, batch 32; tokenizer 64 px
    # Infinity-2B + HEAR, d32 VAE, 1024 px face crop (FT 265, v_hf 10256), grad checkpointing (docs/performance.md)
    "infinity_2b": {"pn": "1M", "batch_size": 4, "text_len": 64, "face_size": 1024, "hf_first_scale": 6,
                    "patch_size": 16, "vae_base_ch": 128, "vae_ch_mult": (1, 2, 4, 4, 4), "vae_res_blocks": 2},
}


def peak_memory(device, reset=False):
    """GiB at the peak since the last reset: CUDA max_memory_allocated; on CPU peak RSS (Linux VmHWM, clear_refs)."""
    if device.startswith("cuda"):
        return torch.cuda.reset_peak_memory_stats() if reset else round(torch.cuda.max_memory_allocated() / 2**30, 2)
    if reset:
        return Path("/proc/self/clear_refs").write_text("5")
    return round(int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text())[1]) / 2**20, 2)  # KiB->GiB


def timed(fn, cfg, device, label):
    """Mean seconds per call on cfg.clock after cfg.warmup untimed calls; --profile: the timed calls' per-op table."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else lambda: None
    clock = time.process_time if cfg.clock == "cpu" else time.perf_counter
    for _ in range(cfg.warmup):
        fn()
    sync()
    with torch.profiler.profile() if cfg.profile else nullcontext() as prof:
        t = clock()
        for _ in range(cfg.iters):
            fn()
        sync()
        dt = (clock() - t) / cfg.iters
    if cfg.profile:
        sort = "self_cuda_time_total" if device.startswith("cuda") else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=sort, row_limit=15)
        print(f"--- {label}, {cfg.iters} calls, {run_info(device)}\n{table}", file=sys.stderr, flush=True)
    return dt


def utilisation(cfg, device, flops_per_s):
    """MFU (3 digits) over the bf16 peak on CUDA (None: unknown GPU); on CPU over 3 timed 2048^2 fp32 matmuls."""
    if device.startswith("cuda"):
        return {"mfu": float(f"{flops_per_s / peak_flops(device):.3g}") if peak_flops(device) else None}
    a = torch.randn(2048, 2048)
    ref = 2 * 2048**3 / timed(lambda: a @ a, dataclasses.replace(cfg, warmup=1, iters=3, profile=False), device, "")
    return {"cpu_mfu": float(f"{flops_per_s / ref:.3g}"), "matmul_gflops": round(ref / 1e9, 1)}


def transformer(cfg, device):
    """The HEAR transformer of the preset's sizes on the device, random conditions, and generate() bound to them."""
    _, schedule, grid = geometry(cfg.pn, cfg.image_size, 1.0, cfg.patch_size)
    sizes = hear_model.INFINITY_2B if cfg.preset == "infinity_2b" else dict(
        depth=cfg.depth, embed_dim=cfg.embed_dim, num_heads=4, codebook_dim=32, text_channels=cfg.text_channels,
        text_maxlen=max(64, cfg.text_len))
    face = fe.face_schedule(cfg.face_size, cfg.patch_size, cfg.hf_first_scale)  # FT must leave v_hf tokens
    n_global = fe.hf_split(face, cfg.hf_first_scale)  # v_g = v[:FT] (the synthfaces global view), v_hf = v[FT:]
    B, d, T, n_hf = cfg.batch_size, sizes["codebook_dim"], cfg.text_len, tok.token_offsets(face)[-1] - n_global
    with torch.device(device):  # random init on the GPU for the 2B
        net = hear_model.HEARTransformer(hear_model.ModelConfig(
            **sizes, use_global_face=True, global_face_dim=d, use_hf_adapter=True, hf_face_dim=d,
            grad_checkpointing=cfg.preset == "infinity_2b"))
        text, lens = torch.randn(B, T, sizes["text_channels"]), torch.full((B,), T)
        v_g, v_hf = (torch.randn(B, n, d) * d**-0.5 for n in (n_global, n_hf))  # face tokens, Eq. (5)
    generate = functools.partial(net.generate, text, lens, schedule, grid, face_global=v_g, face_hf=v_hf)
    return SimpleNamespace(net=net, schedule=schedule, grid=grid, L=tok.token_offsets(schedule)[-1], text=text,
                           lens=lens, v_g=v_g, v_hf=v_hf, generate=generate)


def bench_train(cfg, device, s):
    net, B, L, d = s.net.train(), cfg.batch_size, s.L, s.net.cfg.codebook_dim
    if cfg.compile:  # as train.py compiles: each block (model.compile_blocks)
        net.compile_blocks()
    x, bits = torch.randn(B, L - 1, d, device=device) * d**-0.5, torch.randint(0, 2, (B, L, d), device=device)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=device.startswith("cuda"))

    def step():
        with autocast(device):
            logits = net(s.text, s.lens, x, s.schedule, s.grid, s.v_g, s.v_hf)
        hear_model.bitwise_loss(logits, bits).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    dt = timed(step, cfg, device, "train")
    flops = net.estimate_flops_per_token(s.schedule, cfg.text_len, s.v_g.shape[1], s.v_hf.shape[1]) * B * L
    return dict(params_M=round(net.num_params() / 1e6, 2), batch=B, tokens_per_image=L, step_s=round(dt, 4),
                tokens_per_s=round(B * L / dt), **utilisation(cfg, device, flops / dt))


def make_vae(cfg, device):
    """A random BSQ-VAE of the preset's sizes."""
    with torch.device(device):
        return tok.BSQVAE(tok.TokenizerConfig(cfg.vae_base_ch, cfg.vae_ch_mult, cfg.vae_res_blocks, 32, cfg.patch_size))


def bench_tokenizer(cfg, device, _):
    vae, B = make_vae(cfg, device), cfg.batch_size
    (H, W), schedule, _ = geometry(cfg.pn, cfg.image_size, 1.0, cfg.patch_size)
    x = torch.rand(B, 3, H, W, device=device) * 2 - 1
    loss_fn = fl.CompositeLoss({"l1": 0.2, "l2": 1.0, "vq": 1.0}, alpha=1.0)  # train_tokenizer's synthfaces loss
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, betas=(0.9, 0.99), fused=device.startswith("cuda"))

    def step():
        with autocast(device):
            features, q, recon = vae(x, schedule)
        loss, _ = loss_fn(recon.float(), x, torch.zeros(B, 4), tok.bsq_aux_loss(q["inputs"])["aux"], features)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()

    with FlopCounterMode(display=False) as counter:  # one eager step (a compiled one would hide its ops)
        step()
    for part in (vae.encoder, vae.decoder) if cfg.compile else ():
        part.compile()
    dt, flops = timed(step, cfg, device, "tokenizer step"), counter.get_total_flops()
    return dict(batch=B, pixels=f"{H}x{W}", step_s=round(dt, 4), img_per_s=round(B / dt, 1), flops_per_step=flops,
                **utilisation(cfg, device, flops / dt))


@torch.no_grad()
def bench_sample(cfg, device, s):
    net, vae, B = s.net.eval(), make_vae(cfg, device).eval(), cfg.batch_size
    if cfg.compile:  # dynamic: every scale has its own lengths
        vae.decoder.compile(dynamic=True)
        net.compile_blocks(dynamic=True)
    z = torch.randn(B, net.cfg.codebook_dim, *s.schedule[-1], device=device)  # (B, d, H, W) summed codes
    steps = {"generate": lambda: s.generate(cfg_scale=3.0), "decode": lambda: vae.decode(z)}
    if cfg.t5_layers:  # a random T5 encoder: flan-t5-xl's shape at width 2048 and 24 layers (gated-GELU FFN 2.5 C)
        from transformers import T5Config, T5EncoderModel
        with torch.device(device):
            C = net.cfg.text_channels
            t5 = T5EncoderModel(T5Config(d_model=C, d_kv=64, d_ff=C * 5 // 2, num_layers=cfg.t5_layers,
                                         num_heads=C // 64, feed_forward_proj="gated-gelu", dropout_rate=0.0)).eval()
            ids = torch.randint(2, t5.config.vocab_size, (B, cfg.text_len))
        steps = {"text": lambda: t5(input_ids=ids), **steps}
    with autocast(device):
        out = {f"{name}_s": round(timed(fn, cfg, device, f"sample ({name})"), 4) for name, fn in steps.items()}
    return dict(batch=B, scales=len(s.schedule), **out, s_per_image=round(sum(out.values()) / B, 4))


@torch.no_grad()
def bench_recompute(cfg, device, s):
    """KV-cached sampling vs sampling that reruns all tokens of scales 1..k through the block-causal forward at each
    scale k (the forward test_model checks against the cache's logits; random inputs: values do not change the cost)."""
    net, B, d, offsets = s.net.eval(), cfg.batch_size, s.net.cfg.codebook_dim, tok.token_offsets(s.schedule)
    x, gen = torch.randn(B, s.L - 1, d, device=device) * d**-0.5, torch.Generator(device=device).manual_seed(0)

    def recompute():
        summed = 0
        for k, (h, w) in enumerate(s.schedule):
            logits = net(s.text, s.lens, x[:, : offsets[k + 1] - 1], s.schedule[: k + 1], s.grid, s.v_g, s.v_hf)
            bits = hear_model.sample_bits(logits[:, -h * w:].reshape(B, -1, 2), generator=gen).view(B, h, w, d)
            summed, _ = tok.add_scale(summed, bits, s.schedule, k)  # the cached sampler's work besides the model

    with autocast(device):
        kv_s = timed(lambda: s.generate(cfg_scale=1.0, generator=gen), cfg, device, "KV-cached sampling")
        re_s = timed(recompute, cfg, device, "recompute sampling")
    limit = sum(offsets[1:]) / s.L  # tokens the recompute path runs / tokens the cached path runs
    return dict(batch=B, scales=len(s.schedule), kv_s=round(kv_s, 4), recompute_s=round(re_s, 4),
                ratio=round(re_s / kv_s, 3), token_limit=round(limit, 3), of_limit=round(re_s / kv_s / limit, 3))


STAGES = {"train": bench_train, "tokenizer": bench_tokenizer, "sample": bench_sample, "recompute": bench_recompute}


def main(cfg):
    device, stages = resolve_device(cfg.device), cfg.what.split(",")
    if any(s not in STAGES for s in stages):
        raise UserError(f"--what={cfg.what!r}: choose a comma-separated list of {', '.join(STAGES)}")
    if cfg.clock not in ("wall", "cpu") or (cfg.clock == "cpu" and device != "cpu"):
        raise UserError(f"--clock={cfg.clock!r}: wall, or cpu (process time) on --device=cpu")
    model = functools.cache(lambda: transformer(cfg, device))  # built once, by the first stage that needs it
    results = []
    for name in stages:
        peak_memory(device, reset=True)
        r = STAGES[name](cfg, device, None if name == "tokenizer" else model())
        r = {"what": name, "preset": cfg.preset, "device": run_info(device).split("device ")[-1],
             "compile": cfg.compile, "clock": cfg.clock, **r}
        r.update(peak_mem_GiB=peak_memory(device), load_avg=round(os.getloadavg()[0], 2))  # 1-min load at the end
        results.append(r)
        print(json.dumps(r), flush=True)
    return results


if __name__ == "__main__":
    cli(main, Config, PRESETS)
