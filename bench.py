"""
Speed, peak memory and MFU at the sizes of a preset, random weights and inputs (a benchmark, not a test).

  python bench.py --preset=synthfaces --threads=1                      # CPU: every stage at the quick-start sizes
  python bench.py --preset=synthfaces --what=tokenizer --compile=True --profile=True
  python bench.py --preset=infinity_2b --what=train --pn=0.06M --batch_size=32  # GPU: Infinity-2B + HEAR, 256 px
  bash tests/gpu/run.sh                                                # the whole GPU check (one H100 / H200)

One JSON line per stage (--what), with its peak memory (CPU: peak RSS; CUDA: max_memory_allocated) and load average.
train: transformer step. tokenizer: BSQ-VAE step (train_tokenizer's synthfaces loss), encode / decode img/s. sample:
KV-cached CFG sampling, split into text encoding (a random T5 of --t5_layers), generation and decoding. recompute: KV
cache vs rerunning the prefix at every scale, cfg 1 both; the ratio's token-count limit is sum(prefix lengths) / L.
MFU: model FLOP/s over the bf16 peak; on CPU (cpu_mfu) over a 2048^2 fp32 matmul timed in-process at the same thread
count. Transformer: estimate_flops_per_token (mfu_with_kv adds the text / face K/V projections). Tokenizer: the
convolutions as FlopCounterMode counts one step (norms, swish, quantizer, loss, AdamW left out). --profile: top 15 ops.
"""

import dataclasses
import functools
import json
import os
import re
import time
from contextlib import nullcontext
from types import SimpleNamespace

import torch
from torch.utils.flop_counter import FlopCounterMode

import face_encoder as fe
import model as hear_model
import tokenizer as tok
from common import UserError, autocast, cli, peak_flops, resolve_device, run_info
from data.manifest import geometry


@dataclasses.dataclass
class Config:
    preset: str = "synthfaces"  # preset name
    what: str = "train,tokenizer,sample,recompute"  # comma-separated stages (see above)
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "bfloat16"  # autocast dtype on CUDA (CPU runs fp32)
    compile: bool = False  # torch.compile the model (train), each block (sample), the VAE's encoder and decoder
    channels_last: bool = False  # channels_last memory format for the VAE's convolutions
    threads: int = 0  # torch intra-op threads (0 = torch's default)
    profile: bool = False  # print a torch.profiler per-op table of each timed stretch
    clock: str = "wall"  # wall | cpu: process CPU time (CPU only; with --threads=1 the steadier figure on a busy box)
    batch_size: int = 32  # images per transformer step / sampling call
    tokenizer_batch: int = 16  # images per tokenizer step
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
    vae_res_blocks: int = 1  # ResnetBlocks per encoder level (official d32: 2)
    t5_layers: int = 0  # sample: a random T5 encoder of the text width (24 at width 2048 = flan-t5-xl); 0 = none
    grad_checkpointing: bool = False  # the 2B at 1024 px needs it
    warmup: int = 2  # untimed iterations
    iters: int = 5  # timed iterations
    out: str = ""  # optional JSONL file to append results to


PRESETS = {
    "synthfaces": {},  # the quick-start sizes: transformer depth 4, C 128, batch 32; tokenizer 64 px, batch 16
    # Infinity-2B + HEAR, official d32 BSQ-VAE, 1024 px face crop (FT 265, v_hf 10256). Training at 1M, batch 4, grad
    # checkpointing: ~35 GB weights + grads + AdamW, per image ~2.8 GB of saved block inputs + ~3 GB for one block
    "infinity_2b": {"pn": "1M", "batch_size": 4, "tokenizer_batch": 4, "text_len": 64, "face_size": 1024,
                    "hf_first_scale": 6, "patch_size": 16, "vae_base_ch": 128, "vae_ch_mult": (1, 2, 4, 4, 4),
                    "vae_res_blocks": 2, "grad_checkpointing": True},
}


def peak_memory(device, reset=False):
    """GiB at the peak since the last reset: CUDA max_memory_allocated; on CPU the process's peak RSS (Linux VmHWM,
    reset through clear_refs; None without /proc)."""
    if device.startswith("cuda"):
        return torch.cuda.reset_peak_memory_stats() if reset else round(torch.cuda.max_memory_allocated() / 2**30, 2)
    if not os.path.exists("/proc/self/status"):
        return None
    if reset:
        with open("/proc/self/clear_refs", "w") as f:
            return f.write("5")
    with open("/proc/self/status") as f:
        return round(int(re.search(r"VmHWM:\s+(\d+)", f.read())[1]) / 2**20, 2)  # KiB -> GiB


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def timed(fn, cfg, device, label):
    """Mean seconds per call after cfg.warmup untimed calls; with --profile, the per-op table of the timed calls."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else lambda: None
    clock = CLOCKS[cfg.clock]
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
        print(f"--- {label}, {cfg.iters} calls, {run_info(device)}")
        print(prof.key_averages().table(sort_by=sort, row_limit=15), flush=True)
    return dt


def utilisation(device, clock, **flops_per_s):
    """MFU of each named FLOP/s (3 digits): over the bf16 peak on CUDA (None for an unknown GPU); on CPU ("cpu_" names)
    over the FLOP/s of 2048 x 2048 fp32 matmuls timed now on `clock` for 0.5 s, at the stage's threads and load."""
    if device.startswith("cuda"):
        ref, extra = peak_flops(device), {}
    else:
        a = torch.randn(2048, 2048)
        a @ a  # warm-up
        reps, t = 0, CLOCKS[clock]()
        while reps == 0 or CLOCKS[clock]() - t < 0.5:
            a @ a
            reps += 1
        ref = 2 * 2048**3 * reps / (CLOCKS[clock]() - t)
        flops_per_s, extra = {f"cpu_{k}": v for k, v in flops_per_s.items()}, {"matmul_gflops": round(ref / 1e9, 1)}
    return {**{k: float(f"{v / ref:.3g}") if ref else None for k, v in flops_per_s.items()}, **extra}


def transformer(cfg, device):
    """The HEAR transformer of the preset's sizes, initialised on the device, and random conditions for it."""
    _, schedule, grid = geometry(cfg.pn, cfg.image_size, 1.0, cfg.patch_size)
    sizes = hear_model.INFINITY_2B if cfg.preset == "infinity_2b" else dict(
        depth=cfg.depth, embed_dim=cfg.embed_dim, num_heads=cfg.num_heads, codebook_dim=cfg.codebook_dim,
        text_channels=cfg.text_channels, text_maxlen=max(64, cfg.text_len))
    face_schedule = tok.small_schedule(cfg.face_size // cfg.patch_size, cfg.face_size // cfg.patch_size)
    n_global = fe.hf_split(face_schedule, cfg.hf_first_scale)  # FT: v_g = v[:FT] (the synthfaces global view)
    n_hf = tok.token_offsets(face_schedule)[-1] - n_global if cfg.hf_first_scale else 0  # v_hf = v[FT:], Eq. (5)
    with torch.device(device):  # random init on the GPU for the 2B
        net = hear_model.HEARTransformer(hear_model.ModelConfig(
            **sizes, use_global_face=True, global_face_dim=sizes["codebook_dim"], use_hf_adapter=n_hf > 0,
            hf_face_dim=sizes["codebook_dim"], grad_checkpointing=cfg.grad_checkpointing))
        B, d, T = cfg.batch_size, sizes["codebook_dim"], cfg.text_len
        return SimpleNamespace(net=net, schedule=schedule, grid=grid, L=tok.token_offsets(schedule)[-1],
                               text=torch.randn(B, T, sizes["text_channels"]), lens=torch.full((B,), T),
                               n_global=n_global, v_g=torch.randn(B, n_global, d) * d**-0.5,
                               n_hf=n_hf, v_hf=torch.randn(B, n_hf, d) * d**-0.5 if n_hf else None)


def bench_train(cfg, device, s):
    net, B, L, d = s.net.train(), cfg.batch_size, s.L, s.net.cfg.codebook_dim
    fwd = torch.compile(net) if cfg.compile else net
    x, bits = torch.randn(B, L - 1, d, device=device) * d**-0.5, torch.randint(0, 2, (B, L, d), device=device)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=device.startswith("cuda"))

    def step():
        with autocast(device, cfg.dtype):
            logits = fwd(s.text, s.lens, x, s.schedule, s.grid, s.v_g, s.v_hf)
        hear_model.bitwise_loss(logits, bits).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    dt = timed(step, cfg, device, "train")
    keys = cfg.text_len + s.n_global  # cross-attention keys besides the adapter's
    per_token = net.estimate_flops_per_token(s.schedule, keys, s.n_hf)
    kv = 12 * net.cfg.depth * net.cfg.embed_dim**2 * (keys + s.n_hf)  # per image: K/V projections, fwd + bwd
    return dict(params_M=round(net.num_params() / 1e6, 2), batch=B, tokens_per_image=L, step_s=round(dt, 4),
                tokens_per_s=round(B * L / dt), **utilisation(device, cfg.clock, mfu=per_token * B * L / dt,
                                                              mfu_with_kv=(per_token * L + kv) * B / dt))


def make_vae(cfg, device, compile=False):
    """A random BSQ-VAE of the preset's sizes (encoder and decoder compiled in place when `compile`)."""
    with torch.device(device):
        vae = tok.BSQVAE(tok.TokenizerConfig(cfg.vae_base_ch, cfg.vae_ch_mult, cfg.vae_res_blocks, cfg.codebook_dim,
                                             cfg.patch_size))
    for part in (vae.encoder, vae.decoder) if compile else ():
        part.compile()
    return vae.to(memory_format=torch.channels_last) if cfg.channels_last else vae


def bench_tokenizer(cfg, device, _):
    vae, B = make_vae(cfg, device), cfg.tokenizer_batch
    (H, W), schedule, _ = geometry(cfg.pn, cfg.image_size, 1.0, cfg.patch_size)
    x = torch.rand(B, 3, H, W, device=device) * 2 - 1  # (channels_last weights make the convolutions channels_last)
    loss_fn = fe.CompositeLoss({"l1": 0.2, "l2": 1.0, "vq": 1.0}, alpha=1.0)  # train_tokenizer's synthfaces loss
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, betas=(0.9, 0.99), fused=device.startswith("cuda"))

    def step():
        with autocast(device, cfg.dtype):
            features, q, recon = vae(x, schedule)
        loss, _ = loss_fn(recon.float(), x, torch.zeros(B, 4), tok.bsq_aux_loss(q["inputs"])["aux"], features)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()

    with FlopCounterMode(display=False) as counter:  # one eager step
        step()
    for part in (vae.encoder, vae.decoder) if cfg.compile else ():
        part.compile()
    dt, flops = timed(step, cfg, device, "tokenizer step"), counter.get_total_flops()
    with torch.no_grad(), autocast(device, cfg.dtype):
        z = vae.eval().encode(x)
        enc, dec = timed(lambda: vae.encode(x), cfg, device, "encode"), timed(lambda: vae.decode(z), cfg, device, "dec")
    return dict(batch=B, pixels=f"{H}x{W}", step_s=round(dt, 4), img_per_s=round(B / dt, 1),
                flops_per_step=flops, **utilisation(device, cfg.clock, mfu=flops / dt),
                encode_img_per_s=round(B / enc, 1), decode_img_per_s=round(B / dec, 1))


@torch.no_grad()
def bench_sample(cfg, device, s):
    net, vae, B, state = s.net.eval(), make_vae(cfg, device, cfg.compile).eval(), cfg.batch_size, {"text": s.text}
    for block in net.blocks if cfg.compile else ():  # each scale has its own token and cache lengths: dynamic
        block.compile(dynamic=True)

    def generate():
        gen = torch.Generator(device=device).manual_seed(0)
        state["latent"] = net.generate(state["text"], s.lens, s.schedule, s.grid, cfg_scale=3.0, face_global=s.v_g,
                                       face_hf=s.v_hf, generator=gen)["latent"]  # (B, d, H, W)

    steps = {"generate": generate, "decode": lambda: vae.decode(state["latent"])}
    if cfg.t5_layers:  # a random T5 encoder: flan-t5-xl's shape at width 2048 and 24 layers (gated-GELU FFN 2.5 C)
        from transformers import T5Config, T5EncoderModel

        C = net.cfg.text_channels
        with torch.device(device):
            t5 = T5EncoderModel(T5Config(d_model=C, d_kv=64, d_ff=C * 5 // 2, num_layers=cfg.t5_layers,
                                         num_heads=C // 64, feed_forward_proj="gated-gelu", dropout_rate=0.0)).eval()
            ids = torch.randint(2, t5.config.vocab_size, (B, cfg.text_len))
        steps = {"text": lambda: state.update(text=t5(input_ids=ids).last_hidden_state.float()), **steps}
    out = {}
    for name, fn in steps.items():
        peak_memory(device, reset=True)
        with autocast(device, cfg.dtype):
            out[f"{name}_s"] = round(timed(fn, cfg, device, f"sample ({name})"), 4)
        out[f"{name}_peak_GiB"] = peak_memory(device)
    return dict(batch=B, scales=len(s.schedule), **out, s_per_image=round(sum(out[f"{n}_s"] for n in steps) / B, 4),
                peak_mem_GiB=max(out[f"{n}_peak_GiB"] or 0 for n in steps))


@torch.no_grad()
def generate_recompute(net, text, lens, schedule, grid, face_global=None, face_hf=None, generator=None):
    """generate() at cfg 1 without the KV cache: scale k reruns the tokens of scales 1..k through the block-causal
    forward and samples from the logits of scale k -> (logits (B, L, 2d) sampled from, bits per scale)."""
    B, d = text.shape[0], net.cfg.codebook_dim
    summed, inputs, logits, bits = torch.zeros(B, d, *schedule[-1], device=text.device), [], [], []
    for k, (h, w) in enumerate(schedule):
        x = torch.cat(inputs, dim=1) if inputs else text.new_zeros(B, 0, d)  # (B, L_k - 1, d)
        logits.append(net(text, lens, x, schedule[: k + 1], grid, face_global, face_hf)[:, -h * w:])  # (B, hw, 2d)
        bits.append(hear_model.sample_bits(logits[-1].reshape(B, -1, 2), generator=generator).view(B, h, w, d))
        summed, nxt = tok.add_scale(summed, bits[-1], schedule, k)  # the same recursion as generate()
        inputs.append(nxt)
    return torch.cat(logits, dim=1), bits


def bench_recompute(cfg, device, s):
    net, args = s.net.eval(), (s.text, s.lens, s.schedule, s.grid)
    seed = functools.partial(torch.Generator(device=device).manual_seed, 0)
    with autocast(device, cfg.dtype):
        kv_s = timed(lambda: net.generate(*args, cfg_scale=1.0, face_global=s.v_g, face_hf=s.v_hf, generator=seed()),
                     cfg, device, "KV-cached sampling")
        re_s = timed(lambda: generate_recompute(net, *args, s.v_g, s.v_hf, seed()), cfg, device, "recompute sampling")
    prefixes = tok.token_offsets(s.schedule)[1:]  # tokens the recompute path runs at each scale
    limit = sum(prefixes) / prefixes[-1]
    return dict(batch=cfg.batch_size, scales=len(s.schedule), kv_s=round(kv_s, 4), recompute_s=round(re_s, 4),
                ratio=round(re_s / kv_s, 3), token_limit=round(limit, 3), of_limit=round(re_s / kv_s / limit, 3))


STAGES = {"train": bench_train, "tokenizer": bench_tokenizer, "sample": bench_sample, "recompute": bench_recompute}


def main(cfg):
    device = resolve_device(cfg.device)
    stages = cfg.what.split(",")
    if any(s not in STAGES for s in stages):
        raise UserError(f"--what={cfg.what!r}: choose a comma-separated list of {', '.join(STAGES)}")
    if cfg.clock not in CLOCKS or (cfg.clock == "cpu" and device != "cpu"):
        raise UserError(f"--clock={cfg.clock!r}: wall, or cpu (process time) on --device=cpu")
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(0)
    model = functools.cache(lambda: transformer(cfg, device))  # built once, by the first stage that needs it
    results = []
    for name in stages:
        peak_memory(device, reset=True)
        load = os.getloadavg()[0]
        r = STAGES[name](cfg, device, None if name == "tokenizer" else model())
        r = {"what": name, "preset": cfg.preset, "device": run_info(device).split("device ")[-1],
             "compile": cfg.compile, "channels_last": cfg.channels_last, "clock": cfg.clock, **r}
        r.setdefault("peak_mem_GiB", peak_memory(device))
        r["load_avg"] = round(max(load, os.getloadavg()[0]), 2)  # the busier of the stage's start and end
        results.append(r)
        print(json.dumps(r), flush=True)
        if cfg.out:
            with open(cfg.out, "a") as f:
                f.write(json.dumps(r) + "\n")
    return results


if __name__ == "__main__":
    cli(main, Config, PRESETS)
