"""bench.py at tiny sizes: every stage reports the fields it claims, and what can be checked is checked (the tokenizer
FLOPs are the convolutions' formula, the recompute limit is the token count, the peak memory sees an allocation). Not a
timing test."""

import json

import pytest
import torch

import bench
import model as hear_model
import tokenizer as tok
from common import parse_config

TINY = ["--image_size=16", "--patch_size=2", "--vae_ch_mult=(1,1)", "--depth=1", "--embed_dim=64", "--batch_size=2",
        "--face_size=16", "--warmup=0", "--iters=1", "--device=cpu"]

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


def test_bench_reports_each_stage(capsys):
    cfg = parse_config(bench.Config, bench.PRESETS, TINY + ["--t5_layers=1"])
    results = bench.main(cfg)
    assert [r["what"] for r in results] == ["train", "tokenizer", "sample", "recompute"]
    train, tokenizer, sample, recompute = results
    assert train["tokens_per_image"] == 121 and train["tokens_per_s"] > 0  # 16 px / patch 2: scales 1, 2, 4, 6, 8
    assert 0 < train["cpu_mfu"] and train["matmul_gflops"] > 0
    assert tokenizer["pixels"] == "16x16" and tokenizer["cpu_mfu"] > 0 and tokenizer["img_per_s"] > 0
    assert all(sample[f"{s}_s"] > 0 for s in ("text", "generate", "decode"))
    # the recompute path runs 1 + 5 + 21 + 57 + 121 tokens against the cache's 121
    assert recompute["scales"] == 5 and recompute["token_limit"] == round(205 / 121, 3) and recompute["ratio"] > 0
    assert all(r["peak_mem_GiB"] > 0 and r["load_avg"] >= 0 and r["device"] == "cpu x1" for r in results)
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == results  # stdout: the JSON lines


@pytest.mark.parametrize("arg, words", [("--what=train,vea", "vea"), ("--clock=gpu", "clock")])
def test_bad_stage_or_clock_is_a_user_error(arg, words):
    cfg = parse_config(bench.Config, bench.PRESETS, TINY + [arg])
    with pytest.raises(bench.UserError, match=words):
        bench.main(cfg)


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


def test_flops_per_token_is_6n_plus_12_depth_c_keys():
    """model.estimate_flops_per_token, the one count behind bench's and train.py's MFU, by hand for 2 scales. N per
    block: 6 C^2 (SA qkv and proj, CA q and proj; the CA K/V projections run on text and face tokens, not counted)
    + 2 C h + h (FFN) + 14 C (6 biases, ca_norm, AdaLN offsets) + H (query scale); + word_embed and head."""
    C, H, h, d, depth = 64, 4, 256, 8, 2  # h: the FFN width, round(4 C / 256) * 256
    net = hear_model.HEARTransformer(hear_model.ModelConfig(
        depth=depth, embed_dim=C, num_heads=H, codebook_dim=d, text_channels=128, text_maxlen=8, use_global_face=True,
        global_face_dim=d, use_hf_adapter=True, hf_face_dim=d))
    N = depth * (6 * C**2 + 2 * C * h + h + 14 * C + H) + (d * C + C) + (2 * d * C + 2 * d)
    seen = (1 * 1 + 4 * (1 + 4)) / 5  # scales 1x1 and 2x2: the first token sees itself, each of the next 4 sees 5
    keys = seen + 7 + 3 + 10  # + 7 caption tokens, 3 global face tokens (joined to the text), 10 high-frequency ones
    flops = net.estimate_flops_per_token([(1, 1), (2, 2)], text_len=7, num_global_tokens=3, num_hf_tokens=10)
    assert flops == pytest.approx(6 * N + 12 * depth * C * keys, rel=1e-12)


def test_peak_memory_sees_an_allocation():
    bench.peak_memory("cpu", reset=True)
    before = bench.peak_memory("cpu")
    x = torch.ones(2**26)  # 256 MiB, written, so resident
    peak = bench.peak_memory("cpu")
    del x
    assert peak >= before + 0.24
