"""tokenizer.py vs the official Infinity BSQ-VAE: numerical parity on data made by the official code
(fixtures/infinity, see its README), the full-size key manifest, and strict checkpoint loading.
Every configuration (widths, d, image size, schedule) is read from the fixture JSON or inferred from the weights.
`python -m pytest tests/test_tokenizer.py -q -s` also prints max |ours - official| and its bar (conftest) for every
compared tensor."""

import glob
import json
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import tokenizer as tok

from conftest import FIXTURES, layer_stats, max_diff, parity_bar, quantizer_bar


def load_fixture(stem):
    """-> (json metadata, weights {official name: tensor}, reference tensors {name without 'fixture.': tensor})."""
    with open(os.path.join(FIXTURES, f"{stem}.json")) as f:
        meta = json.load(f)
    tensors = load_file(os.path.join(FIXTURES, f"{stem}.safetensors"))
    weights = {k: v for k, v in tensors.items() if not k.startswith("fixture.")}
    ref = {k.removeprefix("fixture."): v for k, v in tensors.items() if k.startswith("fixture.")}
    return meta, weights, ref


def hw_schedule(meta):
    """Official (t, h, w) schedule with t = 1 -> our [(h, w)]."""
    return [tuple(s[-2:]) for s in meta["scale_schedule"]]


@pytest.fixture(scope="module")
def vae_tiny():
    meta, weights, ref = load_fixture("vae_tiny")
    return meta, weights, ref, tok.load_infinity_vae(weights)


def test_config_inferred_from_weights(vae_tiny):
    meta, _, ref, vae = vae_tiny
    want = meta["config"]
    got = vae.cfg
    assert (got.base_ch, list(got.ch_mult), got.num_res_blocks, got.codebook_dim, got.patch_size) == (
        want["base_ch"], want["ch_mult"], want["num_res_blocks"], want["codebook_dim"], want["patch_size"])
    assert not vae.training and all(p.dtype == torch.float32 for p in vae.parameters())
    assert list(ref["input_image"].shape[-2:]) == want["image_hw"]


def encoder_bar(vae, ref):
    return parity_bar(ref, *layer_stats(vae.encoder))


def decoder_bar(vae, ref):
    return parity_bar(ref, *layer_stats(vae.decoder))


@torch.no_grad()
def test_encoder_parity(vae_tiny):
    _, _, ref, vae = vae_tiny
    h = vae.encode(ref["input_image"])  # (B, d, H, W)
    assert h.dtype == torch.float32 and h.is_contiguous()  # computed channels-last, handed back as plain NCHW
    bar = encoder_bar(vae, ref["h"])
    assert max_diff("h (encoder)", h, ref["h"], bar) <= bar


@torch.no_grad()
def test_quantizer_parity_from_official_features(vae_tiny):
    """Eq. (9)-(10) on the official h: residual inputs, bits (exact), codes, z."""
    meta, _, ref, vae = vae_tiny
    schedule = hw_schedule(meta)
    q = vae.quantize(ref["h"], schedule)
    for k in range(len(schedule)):
        residual, codes = ref[f"residual_in.{k}"].squeeze(2), ref[f"codes.{k}"].squeeze(2)
        bar = quantizer_bar(residual, schedule)
        assert max_diff(f"residual_in.{k}", q["inputs"][k], residual, bar) <= bar
        assert torch.equal(q["bits"][k], ref[f"bits.{k}"].squeeze(1)), f"bits differ at scale {k}"
        max_diff(f"bits.{k}", q["bits"][k], ref[f"bits.{k}"].squeeze(1), 0)
        bar = quantizer_bar(codes, schedule)
        assert max_diff(f"codes.{k}", q["codes"][k], codes, bar) <= bar
    bar = quantizer_bar(ref["z"], schedule)
    assert max_diff("z", q["z"], ref["z"], bar) <= bar


@torch.no_grad()
def test_bits_end_to_end_from_image(vae_tiny):
    """Image -> our encoder -> bits equal the official bits (a flip is tolerated only where |residual| is within the
    encoder's bar: an area average or a difference with exact codes does not grow the error of h)."""
    meta, _, ref, vae = vae_tiny
    schedule = hw_schedule(meta)
    q = vae.quantize(vae.encode(ref["input_image"]), schedule)
    h_bar = encoder_bar(vae, ref["h"])
    for k in range(len(schedule)):
        differ = q["bits"][k] != ref[f"bits.{k}"].squeeze(1)  # (B, h, w, d)
        near_zero = ref[f"residual_in.{k}"].squeeze(2).permute(0, 2, 3, 1).abs() <= h_bar
        assert not (differ & ~near_zero).any(), f"scale {k}: {int(differ.sum())} bits differ"
    bar = encoder_bar(vae, ref["z"])
    assert max_diff("z (from image)", q["z"], ref["z"], bar) <= bar


@torch.no_grad()
def test_decoder_parity(vae_tiny):
    _, _, ref, vae = vae_tiny
    raw = vae.decode(ref["z"], clamp=False)
    assert raw.is_contiguous()  # computed channels-last, handed back as plain NCHW
    bar = decoder_bar(vae, ref["decoder_raw"])
    assert max_diff("decoder_raw", raw, ref["decoder_raw"], bar) <= bar
    clamped = ref["decoder_raw"].clamp(-1, 1)  # clamping shrinks no error: the bar of the raw output holds
    assert max_diff("decode (clamped)", vae.decode(ref["z"]), clamped, bar) <= bar


@pytest.mark.parametrize("error", ["bilinear upsample", "no GroupNorm", "swapped channels"])
@torch.no_grad()
def test_decoder_bar_catches_layout_errors(vae_tiny, error):
    """A decoder with one layout error misses the decoder_raw bar by 100x and more: the bar is tight. The error is made
    in a VAE of this test's own (the module's shared one must stay intact for every other test, in any order)."""
    _, weights, ref, _ = vae_tiny
    vae, z = tok.load_infinity_vae(weights), ref["z"]
    if error == "bilinear upsample":
        for up in (m for m in vae.decoder.modules() if isinstance(m, tok.Upsample)):  # bound to this VAE's modules
            up.forward = lambda x, conv=up.conv: conv(F.interpolate(x, scale_factor=2.0, mode="bilinear"))
    elif error == "no GroupNorm":  # the first norm of the first ResnetBlock after the mid blocks
        vae.decoder.up[-1].block[0].norm1 = torch.nn.Identity()
    else:  # latent channels 0 and 1 swapped (bit order)
        z = z[:, [1, 0, *range(2, z.shape[1])]]
    bar = decoder_bar(vae, ref["decoder_raw"])
    assert max_diff(f"decoder_raw, broken: {error}", vae.decode(z, clamp=False), ref["decoder_raw"], bar) >= 100 * bar


@torch.no_grad()
def test_z_from_bits_parity(vae_tiny):
    meta, _, ref, _ = vae_tiny
    schedule = hw_schedule(meta)
    bits = [ref[f"bits.{k}"].squeeze(1) for k in range(len(schedule))]  # (B, h, w, d)
    bar = quantizer_bar(ref["z_from_bits"], schedule)
    assert max_diff("z_from_bits", tok.bits_to_latent(bits, schedule), ref["z_from_bits"], bar) <= bar
    flat = [b.flatten(1, 2) for b in bits]  # (B, h*w, d), the transformer's layout
    assert torch.equal(tok.bits_to_latent(flat, schedule), tok.bits_to_latent(bits, schedule))


@torch.no_grad()
def test_bsc_noflip_parity():
    """Eq. (11)-(12) with strength 0 on the official requantise path: inputs and labels."""
    with open(os.path.join(FIXTURES, "bsc_noflip.json")) as f:
        meta = json.load(f)
    ref = load_file(os.path.join(FIXTURES, "bsc_noflip.safetensors"))
    schedule = hw_schedule(meta)
    assert tok.token_offsets(schedule)[-1] == sum(meta["token_counts"])
    x, labels = tok.bitwise_self_correction(ref["raw_features"].squeeze(2), schedule, p_max=0.0)
    assert x.dtype == torch.float32 and labels.dtype == torch.uint8
    # (the official requantise and lfq-output paths differ by 2.4e-7, within what CPU kernels differ: not told apart)
    bar = quantizer_bar(ref["x_BLC_wo_prefix"], schedule)
    assert max_diff("bsc x_BLC_wo_prefix", x, ref["x_BLC_wo_prefix"], bar) <= bar
    want = torch.cat([ref[f"labels.{k}"] for k in range(len(schedule))], dim=1)  # (B, L, d)
    max_diff("bsc labels", labels, want, 0)
    assert torch.equal(labels, want)


def vae_manifests():
    paths = sorted(glob.glob(os.path.join(FIXTURES, "manifest_*.json")))
    return [p for p in paths if all(e["key"].split(".")[0] in ("encoder", "decoder", "quantizer", "quantize")
                                    for e in json.load(open(p))["keys"])]


def test_full_size_manifests_on_meta_device():
    """Every VAE key manifest: our module built at full size on the meta device maps one-to-one, same shapes."""
    paths = vae_manifests()
    assert paths, f"no VAE manifest_*.json in {FIXTURES}"
    for path in paths:
        with open(path) as f:
            manifest = json.load(f)
        shapes = {e["key"]: tuple(e["shape"]) for e in manifest["keys"]}
        assert len(shapes) == manifest["num_keys"]
        cfg = tok.config_from_state_dict({k: torch.empty(s, device="meta") for k, s in shapes.items()})
        with torch.device("meta"):
            model = tok.BSQVAE(cfg)
        ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        dropped = {k for k in shapes if k.endswith(".lfq.mask")}  # stateless 2^(d-1..0) buffers, see tokenizer.py
        assert dropped == {"quantizer.lfq.mask", "quantize.lfq.mask"}
        assert ours == {k: s for k, s in shapes.items() if k not in dropped}, os.path.basename(path)
        n_params = sum(p.numel() for p in model.parameters())
        assert n_params == manifest["num_parameters"]
        assert sum(p.numel() for p in model.encoder.parameters()) == manifest["num_parameters_encoder"]


# -----------------------------------------------------------------------------
# strict loading


def flat_spelling(weights):
    """Wrapped official names -> the flat names official load_cnn also accepts: conv1.conv.weight -> conv1.weight."""
    out = {}
    for key, value in weights.items():
        parts = key.split(".")
        if len(parts) >= 3 and parts[-2] in ("conv", "norm"):
            parts = parts[:-2] + parts[-1:]
        out[".".join(parts)] = value
    return out


def test_both_spellings_and_containers_load_the_same(vae_tiny, tmp_path):
    _, weights, _, vae = vae_tiny
    flat = flat_spelling(weights)
    assert "encoder.down.0.downsample.conv.weight" in flat and "encoder.conv_in.weight" in flat
    torch.save({"vae": flat}, tmp_path / "vae.pth")
    save_file(weights, str(tmp_path / "vae.safetensors"))
    expected = vae.state_dict()
    for src in (flat, tmp_path / "vae.pth", str(tmp_path / "vae.safetensors")):
        loaded = tok.load_infinity_vae(src).state_dict()
        assert loaded.keys() == expected.keys()
        assert all(torch.equal(loaded[k], expected[k]) for k in expected)


@pytest.mark.parametrize("damage", ["wrong_shape", "missing", "unexpected"])
def test_bad_checkpoint_is_rejected_with_one_line(vae_tiny, damage):
    _, weights, _, _ = vae_tiny
    bad = dict(weights)
    key = "decoder.up.1.block.0.nin_shortcut.conv.weight"
    if damage == "wrong_shape":
        bad[key] = bad[key][:, :-1]
    elif damage == "missing":
        del bad[key]
    else:
        bad["decoder.extra.weight"] = torch.zeros(3)
    with pytest.raises(tok.CheckpointMismatchError) as err:
        tok.load_infinity_vae(bad)
    message = str(err.value)
    assert "\n" not in message and isinstance(err.value, ValueError)
    assert {"wrong_shape": "shape mismatch", "missing": "missing", "unexpected": "unexpected"}[damage] in message
    assert (key if damage != "unexpected" else "decoder.extra.weight") in message


def test_not_a_vae_checkpoint_is_rejected():
    with pytest.raises(ValueError, match="not a BSQ-VAE checkpoint"):
        tok.load_infinity_vae({"head.weight": torch.zeros(2, 2)})
