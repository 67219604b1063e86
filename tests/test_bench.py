"""bench.py at tiny sizes: every stage reports the fields it claims, and what can be checked is checked (the recompute
sampler is the KV-cached sampler without the cache, the tokenizer FLOPs are the convolutions' formula, the peak memory
sees an allocation). Not a timing test."""

import json

import pytest
import torch

import bench
import tokenizer as tok
from common import parse_config

TINY = ["--image_size=16", "--patch_size=2", "--vae_ch_mult=(1,1)", "--depth=1", "--embed_dim=64", "--batch_size=2",
        "--tokenizer_batch=2", "--face_size=16", "--warmup=0", "--iters=1", "--device=cpu"]

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


def test_bench_reports_each_stage(tmp_path):
    out = tmp_path / "bench.jsonl"
    cfg = parse_config(bench.Config, bench.PRESETS, TINY + ["--t5_layers=1", f"--out={out}"])
    results = bench.main(cfg)
    assert [r["what"] for r in results] == ["train", "tokenizer", "sample", "recompute"]
    train, tokenizer, sample, recompute = results
    assert train["tokens_per_image"] == 121 and train["tokens_per_s"] > 0  # 16 px / patch 2: scales 1, 2, 4, 6, 8
    assert 0 < train["cpu_mfu"] < train["cpu_mfu_with_kv"] and train["matmul_gflops"] > 0
    assert tokenizer["pixels"] == "16x16" and tokenizer["cpu_mfu"] > 0 and tokenizer["decode_img_per_s"] > 0
    assert all(sample[f"{s}_s"] > 0 and sample[f"{s}_peak_GiB"] > 0 for s in ("text", "generate", "decode"))
    assert sample["peak_mem_GiB"] == max(sample[f"{s}_peak_GiB"] for s in ("text", "generate", "decode"))
    # the recompute path runs 1 + 5 + 21 + 57 + 121 tokens against the cache's 121
    assert recompute["scales"] == 5 and recompute["token_limit"] == round(205 / 121, 3) and recompute["ratio"] > 0
    assert all(r["peak_mem_GiB"] > 0 and r["load_avg"] >= 0 and r["device"] == "cpu x1" for r in results)
    assert [json.loads(line) for line in out.read_text().splitlines()] == results


@pytest.mark.parametrize("arg, words", [("--what=train,vea", "vea"), ("--clock=gpu", "clock")])
def test_bad_stage_or_clock_is_a_user_error(arg, words):
    cfg = parse_config(bench.Config, bench.PRESETS, TINY + [arg])
    with pytest.raises(bench.UserError, match=words):
        bench.main(cfg)


def test_recompute_sampler_equals_the_kv_cached_sampler():
    """At cfg 1 the sampler that reruns the whole prefix through the block-causal forward sees the logits the
    KV-cached sampler sees for the same bits (teacher-fed from the recompute run)."""
    cfg = parse_config(bench.Config, bench.PRESETS, TINY)
    s = bench.transformer(cfg, "cpu")
    net = s.net.eval()
    with torch.no_grad():
        for p in net.parameters():  # no parameter near 0, so every path (gammas, adapter) contributes
            p.add_(0.05 * torch.randn_like(p))
    logits, bits = bench.generate_recompute(net, s.text, s.lens, s.schedule, s.grid, s.v_g, s.v_hf,
                                            torch.Generator().manual_seed(0))
    probe = {"teacher_bits": bits}
    out = net.generate(s.text, s.lens, s.schedule, s.grid, cfg_scale=1.0, face_global=s.v_g, face_hf=s.v_hf,
                       generator=torch.Generator().manual_seed(0), probe=probe)
    assert logits.shape == (2, 121, 64) and [b.shape[1:3] for b in bits] == [(h, w) for h, w in s.schedule]
    # fp32, one block of width 64 and up to 121 + 53 + 100 keys: the two paths sum in different orders (1e-6 level)
    torch.testing.assert_close(probe["logits"], logits, atol=1e-5, rtol=0)
    assert torch.equal(out["latent"], tok.bits_to_latent(bits, s.schedule))


def test_tokenizer_flops_are_the_convolutions_formula():
    """FLOPs of one tokenizer step = sum over convolutions of 2 k^2 C_in C_out H_out W_out B for the forward, the
    same for the weight gradient, and again for the input gradient except at conv_in (the image needs none)."""
    cfg = parse_config(bench.Config, bench.PRESETS, TINY + ["--what=tokenizer"])
    reported = bench.main(cfg)[0]["flops_per_step"]
    vae = tok.BSQVAE(tok.TokenizerConfig(32, (1, 1), 1, 32, 2))
    expected = []

    def count(conv, inputs, output):
        k2 = conv.kernel_size[0] * conv.kernel_size[1]
        forward = 2 * k2 * conv.in_channels * conv.out_channels * output[0, 0].numel() * output.shape[0]
        expected.append(forward * (3 if conv is not vae.encoder.conv_in.conv else 2))

    for m in vae.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_hook(count)
    vae(torch.rand(2, 3, 16, 16) * 2 - 1)
    assert reported == sum(expected) and len(expected) > 10


def test_peak_memory_sees_an_allocation():
    bench.peak_memory("cpu", reset=True)
    before = bench.peak_memory("cpu")
    x = torch.ones(2**26)  # 256 MiB, written, so resident
    peak = bench.peak_memory("cpu")
    del x
    assert peak >= before + 0.24
