"""tokenizer.py properties: official scale schedules, small schedules, multi-scale residual BSQ (Eq. 9-10),
bit/index/sequence conversions, bit flips and bitwise self-correction (Eq. 11-12), aux losses, the module API."""

import itertools
import math

import pytest
import torch

import tokenizer as tok
from conftest import parity_bar, quantizer_bar

# [Infinity] dynamic_resolution.py, as tabulated in reference/infinity.md 1.5:
# ratio -> ((1M pixels H, W), L at 1M, (0.25M pixels), L, (0.06M pixels), L); the inverse ratio swaps H and W.
PIXEL_TABLE = {
    1.25: ((1120, 896), 10774, (560, 448), 2814, (320, 256), 614),
    1.333: ((1152, 864), 10973, (576, 432), 2657, (320, 240), 665),
    1.5: ((1248, 832), 10997, (624, 416), 2759, (336, 224), 533),
    1.75: ((1344, 768), 11252, (672, 384), 2628, (336, 192), 472),
    2.0: ((1440, 720), 11269, (736, 368), 2681, (352, 176), 451),
    2.5: ((1600, 640), 10805, (800, 320), 2555, (400, 160), 555),
    3.0: ((1776, 592), 11123, (864, 288), 2588, (432, 144), 509),
}


def test_square_schedules_token_counts():
    for pn, L in {"0.06M": 521, "0.25M": 2521, "0.60M": 6425, "1M": 10521}.items():
        schedule = tok.get_schedule(1.0, pn)
        assert all(h == w for h, w in schedule)
        assert tok.token_offsets(schedule)[-1] == L
    assert tok.get_schedule(1.0, "1M")[-1] == (64, 64) == tok.rope_grid(1.02)
    with pytest.raises(ValueError, match="unknown pn"):
        tok.get_schedule(1.0, "2M")


def test_every_template_matches_the_official_pixel_table():
    assert tok.H_DIV_W_TEMPLATES == [1.0, 1.25, 0.8, 1.333, 0.75, 1.5, 0.666, 1.75, 0.571, 2.0, 0.5, 2.5, 0.4, 3.0,
                                     0.333]
    for ratio, (px1, L1, px25, L25, px06, L06) in PIXEL_TABLE.items():
        inverse = int(1 / ratio * 1000) / 1000
        for pn, (H, W), L in (("1M", px1, L1), ("0.25M", px25, L25), ("0.06M", px06, L06)):
            for template, pixels in ((ratio, (H, W)), (inverse, (W, H))):
                schedule = tok.get_schedule(template, pn)
                assert len(schedule) == tok.PN_NUM_SCALES[pn] and schedule[0] == (1, 1)
                assert (schedule[-1][0] * 16, schedule[-1][1] * 16) == pixels, (template, pn)
                assert tok.token_offsets(schedule)[-1] == L, (template, pn)
    assert tok.nearest_template(0.6667) == 0.666 and tok.nearest_template(1.4) == 1.333
    assert tok.rope_grid(0.5) == (45, 90)


def test_small_schedules():
    assert tok.small_schedule(8, 8) == [(1, 1), (2, 2), (4, 4), (6, 6), (8, 8)]
    assert tok.small_schedule(16, 16) == tok.get_schedule(1.0, "0.06M")  # official where one ends there
    assert tok.small_schedule(20, 16) == tok.get_schedule(1.25, "0.06M")
    for h, w in [(1, 1), (2, 2), (3, 3), (5, 9), (10, 10), (12, 4), (1, 7), (80, 80)]:
        schedule = tok.small_schedule(h, w)
        assert schedule[0] == (1, 1) and schedule[-1] == (h, w)
        areas = [a * b for a, b in schedule]
        assert areas == sorted(set(areas)), schedule  # strictly growing
        assert all(a1 >= a0 and b1 >= b0 for (a0, b0), (a1, b1) in itertools.pairwise(schedule))


def test_token_offsets():
    assert tok.token_offsets([(1, 1), (2, 2), (4, 4)]) == [0, 1, 5, 21]


def test_multiscale_bsq_properties():
    """Eq. (9)-(10): final residual + summed latent == features; codes are +-1/sqrt(d); bits = (residual > 0)."""
    d, schedule = 16, tok.small_schedule(8, 8)
    f = torch.randn(3, d, 8, 8)
    q = tok.multiscale_bsq(f, schedule)
    # residual and z each take one rounding per scale, the final sum one more (conftest: depth 2K + 1, no dot products)
    bar = parity_bar(f.abs() + q["z"].abs(), 2 * len(schedule) + 1, 1)
    torch.testing.assert_close(q["residual"] + q["z"], f, atol=bar, rtol=0)
    assert torch.equal(q["z"], sum(tok.resample(c, (8, 8), "trilinear") for c in q["codes"]))  # same sums, same order
    assert len(q["bits"]) == len(q["codes"]) == len(q["inputs"]) == len(schedule)
    for (h, w), bits, codes, r in zip(schedule, q["bits"], q["codes"], q["inputs"]):
        assert bits.shape == (3, h, w, d) and bits.dtype == torch.uint8 and codes.shape == (3, d, h, w)
        assert torch.equal(bits.bool(), r.permute(0, 2, 3, 1) > 0)
        torch.testing.assert_close(codes.abs(), torch.full_like(codes, d**-0.5))
        torch.testing.assert_close(codes.permute(0, 2, 3, 1), tok.bits_to_codes(bits))
    # each scale explains part of the features: the residual norm shrinks from the input to the end
    assert q["residual"].norm() < f.norm()
    # codes rebuilt from bits can differ from the quantizer's in the last ulp
    bar = quantizer_bar(q["z"], schedule)
    torch.testing.assert_close(tok.bits_to_latent(q["bits"], schedule), q["z"], atol=bar, rtol=0)
    assert tok.resample(f, (8, 8), "area") is f  # no-op at full size
    with pytest.raises(ValueError, match="must end at"):
        tok.multiscale_bsq(f, [(1, 1), (4, 4)])


def test_straight_through_gradient_reaches_features():
    f = torch.randn(2, 8, 4, 4, requires_grad=True)
    q = tok.multiscale_bsq(f, tok.small_schedule(4, 4))
    (q["z"] * torch.randn_like(q["z"])).sum().backward()
    assert f.grad is not None and f.grad.abs().sum() > 0


def test_index_round_trip_and_eq10():
    assert tok.bits_to_index(torch.tensor([1, 0, 1, 1], dtype=torch.uint8)).item() == 1 + 4 + 8  # sum_p b_p 2^p
    for d in (1, 16, 32, 63, 64):
        bits = torch.randint(0, 2, (3, 5, d), dtype=torch.uint8)
        bits[0, 0] = 1  # all ones: the largest index (-1 as int64 for d = 64)
        idx = tok.bits_to_index(bits)
        assert idx.shape == (3, 5) and idx.dtype == torch.int64
        assert torch.equal(tok.index_to_bits(idx, d), bits)
        if d < 63:
            assert idx[0, 0].item() == 2**d - 1 and (idx >= 0).all()
    with pytest.raises(ValueError):
        tok.bits_to_index(torch.zeros(65))


def test_bits_to_sequence_is_row_major_low_to_high():
    """Token t of scale k sits at offset_k + row * w + col; its value is the code (2b - 1)/sqrt(d) of that bit."""
    bits = [torch.randint(0, 2, (1, h, w, 2)) for h, w in [(1, 1), (2, 3)]]
    seq = tok.bits_to_sequence(bits)  # (B, L, d)
    assert seq.shape == (1, 7, 2)
    for k, (b, off) in enumerate(zip(bits, [0, 1])):
        for r in range(b.shape[1]):
            for c in range(b.shape[2]):
                want = (2 * b[0, r, c].float() - 1) / 2**0.5  # bits_to_codes renormalises: a few ulp
                torch.testing.assert_close(seq[0, off + r * b.shape[2] + c], want, atol=0, rtol=1e-6)


@pytest.mark.parametrize("p", [0.0, 0.01, 0.1, 0.3])
def test_flip_bits_rate(p):
    n = 100_000
    bits = torch.randint(0, 2, (n,), dtype=torch.uint8)
    flipped = tok.flip_bits(bits, p, torch.Generator().manual_seed(1))
    assert flipped.dtype == torch.uint8 and set(flipped.unique().tolist()) <= {0, 1}
    count = int((flipped != bits).sum())
    sigma = math.sqrt(n * p * (1 - p))
    assert abs(count - n * p) <= 5 * sigma + 1  # binomial bounds


def test_bsc_flips_and_labels_stay_clean():
    """Eq. (11)-(12) on schedule (1x1, 2x2): the scale-1 input reveals the flipped scale-0 bits; labels stay the
    clean bits, and the scale-1 labels are the bits of the residual on the corrupted path."""
    B, d, p_max = 64, 32, 0.3
    schedule = [(1, 1), (2, 2)]
    generator = torch.Generator().manual_seed(0)
    rates = []
    for _ in range(100):
        f = torch.randn(B, d, 2, 2, generator=generator)
        x, labels = tok.bitwise_self_correction(f, schedule, p_max=p_max, generator=generator)
        assert x.shape == (B, 4, d) and labels.shape == (B, 5, d) and labels.dtype == torch.uint8
        clean0 = (f.mean((2, 3)) > 0).to(torch.uint8)  # area-down to 1x1, sign
        assert torch.equal(labels[:, 0], clean0)
        cum = x.transpose(1, 2).reshape(B, d, 2, 2)  # running sum of the (flipped) scale-0 code at 2x2
        flipped0 = (cum[:, :, 0, 0] > 0).to(torch.uint8)
        rates.append((flipped0 != clean0).float().mean().item())
        assert torch.equal(labels[:, 1:], ((f - cum) > 0).to(torch.uint8).flatten(2).transpose(1, 2))
    # p ~ U{0, 0.01, ..., 0.3} per call: mean p_max / 2, std about 0.09 / sqrt(100) (+ binomial noise)
    assert abs(sum(rates) / len(rates) - p_max / 2) < 0.05
    assert max(rates) < p_max + 0.06 and min(rates) < 0.05


def test_bsc_no_flip_default_and_determinism():
    f = torch.randn(2, 16, 8, 8)
    schedule = tok.small_schedule(8, 8)
    x0, l0 = tok.bitwise_self_correction(f, schedule)
    x1, l1 = tok.bitwise_self_correction(f, schedule, p_max=0.3, generator=torch.Generator().manual_seed(5))
    x2, l2 = tok.bitwise_self_correction(f, schedule, p_max=0.3, generator=torch.Generator().manual_seed(5))
    assert torch.equal(x1, x2) and torch.equal(l1, l2)
    assert torch.equal(l0[:, :1], l1[:, :1])  # the first scale sees the clean features
    L = tok.token_offsets(schedule)[-1]
    assert x0.shape == (2, L - 1, 16) and l0.shape == (2, L, 16)
    # without flips the labels are exactly the multi-scale BSQ bits (trilinear inputs are the transformer's business)
    q = tok.multiscale_bsq(f, schedule)
    assert torch.equal(l0, torch.cat([b.flatten(1, 2) for b in q["bits"]], dim=1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bsc_on_cuda_matches_cpu():
    f = torch.randn(2, 32, 16, 16)
    schedule = tok.small_schedule(16, 16)
    x, labels = tok.bitwise_self_correction(f, schedule)
    xc, lc = tok.bitwise_self_correction(f.cuda(), schedule)
    assert torch.equal(lc.cpu(), labels)
    assert (xc.cpu() - x).abs().max() <= quantizer_bar(x, schedule)
    for gen in (torch.Generator(), torch.Generator("cuda")):
        xg, lg = tok.bitwise_self_correction(f.cuda(), schedule, p_max=0.3, generator=gen.manual_seed(0))
        assert xg.is_cuda and lg.is_cuda


def test_aux_losses():
    f = torch.randn(4, 16, 4, 4, requires_grad=True)
    q = tok.multiscale_bsq(f, tok.small_schedule(4, 4))
    terms = tok.bsq_aux_loss(q["inputs"], commit_weight=0.25, entropy_weight=0.1)
    assert set(terms) == {"aux", "commitment", "per_sample_entropy", "codebook_entropy"}
    assert all(t.dim() == 0 and torch.isfinite(t) for t in terms.values())
    for name in ("per_sample_entropy", "codebook_entropy"):
        assert 0 <= terms[name].item() <= 16 * math.log(2) + 1e-4
    expected = 0.25 * terms["commitment"] + (terms["per_sample_entropy"] - terms["codebook_entropy"]) / 100 * 0.1
    torch.testing.assert_close(terms["aux"], expected)  # one scale's weights are linear, so the means combine
    terms["aux"].backward()
    assert f.grad.abs().sum() > 0


def test_bsqvae_api_small():
    cfg = tok.TokenizerConfig(base_ch=32, ch_mult=(1, 2, 1), num_res_blocks=1, codebook_dim=8, patch_size=4)
    vae = tok.BSQVAE(cfg)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    h = vae.encode(x)
    assert h.shape == (2, 8, 8, 8) and h.dtype == torch.float32
    features, q, recon = vae(x)  # default schedule small_schedule(8, 8)
    assert recon.shape == x.shape and torch.equal(features, h) and q["z"].shape == h.shape
    (recon.square().mean() + tok.bsq_aux_loss(q["inputs"])["aux"]).backward()
    assert vae.encoder.conv_in.conv.weight.grad is not None
    assert vae.decode(h).abs().max() <= 1
    assert tok.load_infinity_vae(vae.state_dict()).cfg == cfg  # architecture (patch 4, 3 levels) inferred back
    with pytest.raises(ValueError, match="patch_size"):
        tok.TokenizerConfig(ch_mult=(1, 2), patch_size=8)
