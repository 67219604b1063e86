"""CUDA-only checks, skipped without a GPU (tests/gpu/run.sh runs them first): FlexAttention's block mask equals the
SDPA mask, bf16 autocast stays within a stated bar of the official fp32 fixtures, torch.compile of the training step
and of the sampling blocks equals eager, and bench.py reports MFU and peak memory on CUDA."""

import copy
import json
import os

import pytest
import torch
from safetensors.torch import load_file

import bench
from common import parse_config
from conftest import watch_sampler
from metrics import peak_flops
from model import BlockMask, HEARTransformer, ModelConfig, bitwise_loss, load_infinity
from tokenizer import add_scale, get_schedule, rope_grid

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

TINY = dict(depth=2, embed_dim=64, num_heads=2, codebook_dim=8, text_channels=128, text_maxlen=8,
            use_global_face=True, global_face_dim=16, use_hf_adapter=True, hf_face_dim=8)
SCHEDULE = get_schedule(1.0, "0.06M")  # 7 scales, L = 521: not a multiple of FlexAttention's 128-token tiles
GRID = rope_grid(1.0)


@pytest.fixture(autouse=True)
def _full_fp32():
    """fp32 means fp32 here: no TF32 in matmuls or in the Triton kernels that follow this flag."""
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, False


def make_model(depth=2):
    """A tiny model on CUDA whose every parameter is perturbed (no gamma or bias near 0, so every path counts)."""
    torch.manual_seed(0)
    model = HEARTransformer(ModelConfig(**{**TINY, "depth": depth}))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.init_hf_adapter_from_backbone()
    return model.cuda()


def make_inputs(B=2):
    """text (B, 6, Ct) with lengths 3 and 6, face tokens, per-scale bits and the teacher-forced inputs (B, L-1, d)."""
    g = torch.Generator().manual_seed(1)
    lens = torch.tensor([3, 6])
    valid = torch.arange(6)[None, :, None] < lens[:, None, None]  # (B, T, 1)
    text = torch.randn(B, 6, TINY["text_channels"], generator=g) * valid
    fg, fhf = torch.randn(B, 3, 16, generator=g), torch.randn(B, 5, 8, generator=g)
    bits = [torch.randint(0, 2, (B, h, w, 8), generator=g) for h, w in SCHEDULE]
    summed, xs = 0, []
    for k, b in enumerate(bits[:-1]):
        summed, nxt = add_scale(summed, b, SCHEDULE, k)
        xs.append(nxt)
    return [t.cuda() for t in (text, lens, fg, fhf, torch.cat(xs, dim=1))], [b.cuda() for b in bits]


@torch.no_grad()
def test_flex_attention_block_mask_equals_sdpa_mask():
    model = make_model().eval()
    (text, lens, fg, fhf, x), _ = make_inputs()
    model.cfg.attn_backend = "sdpa"
    ref = model(text, lens, x, SCHEDULE, GRID, fg, fhf)
    model.cfg.attn_backend = "flex"
    scale_id = torch.cat([torch.full((h * w,), k, device=x.device) for k, (h, w) in enumerate(SCHEDULE)])  # (L,)
    assert isinstance(model.block_causal_mask(SCHEDULE, scale_id), BlockMask)
    got = model(text, lens, x, SCHEDULE, GRID, fg, fhf)
    # fp32 both; the Triton kernel's online softmax sums its 128-key tiles in another order than SDPA (~1e-6 here).
    # A wrong tile (a masked block run or a visible one skipped) moves these logits by 1e-2 or more.
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


BF16_MAX, BF16_MEAN = 5e-2, 1e-2  # bars on |bf16 - fp32 reference| of the teacher-forced logits (|logit| <= 3.0)


@torch.no_grad()
def test_bf16_forward_within_bar_of_the_official_fp32_fixture(fixtures_dir):
    """The bar: the official code's own bf16 cross-attention cast moves these logits by up to 6.9e-3 (fixture README);
    our autocast rounds every matmul input to bf16 (8-bit significand, 2^-9 relative), and CPU bf16 autocast of this
    same forward measured max 1.4e-2, mean 2.4e-3. GPU kernels round at that level in other places (flash attention
    rounds the probabilities to bf16), so the bars are 3.5x / 4x the CPU figures; a real fault (an fp32 island lost,
    a wrong mask, a dropped term) moves logits by 1e-1 or more."""
    tensors = load_file(os.path.join(fixtures_dir, "infinity_tiny.safetensors"))
    with open(os.path.join(fixtures_dir, "infinity_tiny.json")) as f:
        meta = json.load(f)
    model = load_infinity({k: v for k, v in tensors.items() if not k.startswith("fixture.")})[0].cuda()
    fx = {k[len("fixture."):]: v.cuda() for k, v in tensors.items() if k.startswith("fixture.")}
    lens, cu = fx["lens"].long(), fx["cu_seqlens_k"].long()
    text = torch.zeros(len(lens), int(lens.max()), fx["kv_compact"].shape[1], device="cuda")
    for b in range(len(lens)):  # official packed text rows -> our zero-padded (B, T, Ct)
        text[b, : lens[b]] = fx["kv_compact"][cu[b]: cu[b + 1]]
    schedule, grid = [(h, w) for _, h, w in meta["scale_schedule"]], tuple(meta["rope2d_grid_1M"])
    ref = fx["logits_teacher_forced"]
    fp32 = model(text, lens, fx["x_BLC_wo_prefix"], schedule, grid)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        bf16 = model(text, lens, fx["x_BLC_wo_prefix"], schedule, grid).float()
    diff, fp32_diff = (bf16 - ref).abs(), (fp32 - ref).abs().max().item()
    print(f"fp32 max {fp32_diff:.2e}; bf16 max {diff.max().item():.2e} mean {diff.mean().item():.2e}")
    assert fp32_diff < 1e-4  # the CPU parity bar: CUDA fp32 sums in other orders (1e-6 level)
    assert diff.max() < BF16_MAX and diff.mean() < BF16_MEAN


def test_compiled_training_step_equals_eager():
    """Each block compiled as train.py does (model.compile_blocks; FlexAttention inside, as on every CUDA training
    step), forward + backward: same loss, same gradients up to fp32 reordering (Inductor fuses and re-associates
    reductions: 1e-6 relative). Two blocks, so the second reuses the first one's compiled graph."""
    eager = make_model(depth=2).train()
    compiled = copy.deepcopy(eager)
    compiled.compile_blocks()
    (text, lens, fg, fhf, x), bits = make_inputs()
    labels = torch.cat([b.flatten(1, 2) for b in bits], dim=1)  # (B, L, d)
    losses = []
    for model, fwd in ((eager, eager), (compiled, compiled)):
        for _ in range(2):  # the second call runs the cached graph
            model.zero_grad(set_to_none=True)
            loss = bitwise_loss(fwd(text, lens, x, SCHEDULE, GRID, fg, fhf), labels)
            loss.backward()
        losses.append(loss.item())
    assert abs(losses[0] - losses[1]) <= 1e-5 * abs(losses[0])
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        assert (p.grad is None) == (q.grad is None), name  # cfg_uncond: unused without CFG dropout
        if p.grad is not None:
            assert (p.grad - q.grad).abs().max().item() <= 1e-4 * p.grad.abs().max().item() + 1e-9, name


@torch.no_grad()
def test_compiled_sampling_blocks_equal_eager():
    """bench.py --compile=True compiles each block with dynamic shapes (every scale has its own token and cache
    lengths): with the same teacher bits, CFG 3, the sampler sees the same logits as eager."""
    model = make_model(depth=1).eval()
    (text, lens, fg, fhf, _), bits = make_inputs()
    logits = []
    for compile_blocks in (False, True):
        if compile_blocks:
            model.compile_blocks(dynamic=True)
        with watch_sampler(model.cfg.codebook_dim, bits) as seen:
            model.generate(text, lens, SCHEDULE, GRID, cfg_scale=3.0, face_global=fg, face_hf=fhf,
                           generator=torch.Generator(device="cuda").manual_seed(0))
        logits.append(torch.cat(seen, dim=1))
    torch.testing.assert_close(logits[1], logits[0], atol=1e-4, rtol=0)


def test_bench_reports_mfu_and_peak_memory_on_cuda():
    argv = ["--image_size=16", "--patch_size=2", "--vae_ch_mult=(1,1)", "--depth=1", "--embed_dim=64", "--batch_size=2",
            "--face_size=16", "--warmup=1", "--iters=1", "--device=cuda", "--t5_layers=1"]
    results = bench.main(parse_config(bench.Config, bench.PRESETS, argv))
    assert [r["what"] for r in results] == ["train", "tokenizer", "sample", "recompute"]
    assert all(r["peak_mem_GiB"] > 0 for r in results)
    if peak_flops("cuda"):  # a GPU of common.PEAK_FLOPS
        assert 0 < results[0]["mfu"] < 1 and 0 < results[1]["mfu"] < 1
