"""Parity of model.py with the official Infinity code: tensors in fixtures/infinity were produced by the official
FoundationVision/Infinity code in fp32 on CPU (see the fixture README). Every size, schedule and grid comes from the
fixture json or the weights; nothing about the fixture is written here."""

import functools
import glob
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from conftest import layer_stats, max_diff, parity_bar, quantizer_bar, watch_sampler
from model import load_infinity, rope_2d_positions
from tokenizer import get_schedule, rope_grid, token_offsets


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


@functools.cache
def _tiny(fixtures_dir):
    tensors = load_file(os.path.join(fixtures_dir, "infinity_tiny.safetensors"))
    with open(os.path.join(fixtures_dir, "infinity_tiny.json")) as f:
        meta = json.load(f)
    weights = {k: v for k, v in tensors.items() if not k.startswith("fixture.")}
    fx = {k[len("fixture."):]: v for k, v in tensors.items() if k.startswith("fixture.")}
    model, report = load_infinity(weights)
    # official text input (kv_compact rows + cu_seqlens) -> our padded (B, T, Ct) + lengths
    lens, cu = fx["lens"].long(), fx["cu_seqlens_k"].long()
    text = torch.zeros(len(lens), int(lens.max()), fx["kv_compact"].shape[1])
    for b in range(len(lens)):
        text[b, : lens[b]] = fx["kv_compact"][cu[b] : cu[b + 1]]
    schedule = [(h, w) for _, h, w in meta["scale_schedule"]]
    return model, report, meta, fx, text, lens, schedule, tuple(meta["rope2d_grid_1M"])


@pytest.fixture
def tiny(fixtures_dir):
    return _tiny(fixtures_dir)


def _within_bar(model, schedule, pairs, gain=1.0):
    """{name: (ours, official)} -> True when each differs by no more than its bar (conftest): depth = the model's
    Linear layers, fan_in = the longest of their sums and the attention's sum over all L tokens; CFG's gain on top."""
    depth, fan_in = layer_stats(model)
    fan_in = max(fan_in, token_offsets(schedule)[-1])
    bars = {name: parity_bar(ref, depth, fan_in, gain) for name, (_, ref) in pairs.items()}
    return all([max_diff(name, ours, ref, bars[name]) <= bars[name] for name, (ours, ref) in pairs.items()])


def _per_scale_bits(flat_bits, schedule):
    """(B, L, d) -> [(B, h, w, d) per scale]"""
    offs = token_offsets(schedule)
    return [flat_bits[:, offs[k] : offs[k + 1]].reshape(flat_bits.shape[0], h, w, -1)
            for k, (h, w) in enumerate(schedule)]


def test_config_inferred_from_weights(tiny):
    model, report, meta, *_ = tiny
    cfg = report["config"]
    kw, flags = meta["model_kwargs"], meta["constructor_flags"]
    assert (cfg["depth"], cfg["embed_dim"], cfg["num_heads"]) == (kw["depth"], kw["embed_dim"], kw["num_heads"])
    assert (cfg["text_channels"], cfg["text_maxlen"]) == (flags["text_channels"], flags["text_maxlen"])
    assert cfg["codebook_dim"] == meta["codebook_dim_d"]
    assert model.blocks[0].ffn.fc1.out_features == meta["mlp_hidden"]
    assert model.text_proj_for_sos.ca.num_heads == meta["text_pool"]["num_heads"]
    assert model.text_proj_for_sos.ca.head_dim == meta["text_pool"]["head_dim"]
    assert model.num_params() == meta["num_parameters"]
    assert report["newly_initialized"] == [] and all(k.endswith("zero_k_bias") for k in report["ignored"])


def test_schedule_and_rope_positions(tiny):
    *_, meta, _, _, _, schedule, grid = tiny
    assert schedule == get_schedule(meta["h_div_w_template"], meta["pn"])
    assert grid == tuple(rope_grid(meta["h_div_w_template"]))
    assert token_offsets(schedule) == meta["scale_token_offsets"]
    rows, cols = rope_2d_positions(schedule, grid)
    offs = token_offsets(schedule)
    for k, s in enumerate(meta["rope2d_positions_per_scale"]):
        r, c = rows[offs[k] : offs[k + 1]].view(s["h"], s["w"]), cols[offs[k] : offs[k + 1]].view(s["h"], s["w"])
        assert r[:, 0].tolist() == s["rows"] and c[0].tolist() == s["cols"]


def test_teacher_forced_logits_and_intermediates(tiny):
    model, _, _, fx, text, lens, schedule, grid = tiny
    got = {}
    hooks = [getattr(model, name).register_forward_hook(lambda m, i, o, key=key: got.__setitem__(key, o))
             for name, key in [("text_norm", "text_normed"), ("text_proj_for_sos", "cond_BD"),
                               ("text_proj_for_ca", "kv_ca"), ("shared_ada_lin", "gss")]]
    hooks.append(model.blocks[0].register_forward_hook(lambda m, i, o: got.__setitem__("x_block0_out", o)))
    with torch.no_grad():
        logits = model(text, lens, fx["x_BLC_wo_prefix"], schedule, grid)
    for h in hooks:
        h.remove()
    valid = torch.arange(text.shape[1])[None] < lens[:, None]  # padded rows -> the official compact rows
    assert _within_bar(model, schedule, {
        "logits_teacher_forced": (logits, fx["logits_teacher_forced"]),
        "text_normed": (got["text_normed"][valid], fx["text_normed"]),
        "cond_BD": (got["cond_BD"], fx["cond_BD"]),
        "kv_ca": (got["kv_ca"][valid], fx["kv_ca"]),
        "gss": (got["gss"].view(fx["gss"].shape), fx["gss"]),
        "x_block0_out": (got["x_block0_out"], fx["x_block0_out"]),
    })


@pytest.mark.parametrize("run, key", [("givenbits_cfg1", "infer_givenbits_cfg1.logits"),
                                      ("givenbits_cfg", "infer_givenbits_cfg.sampler_logits")])
def test_kv_cached_given_bits(tiny, run, key):
    """Teacher leak of the fixture's bits through the KV-cached sampler (cfg 1, and cfg 3 / tau 0.5 on logits)."""
    model, _, meta, fx, text, lens, schedule, grid = tiny
    r, common = meta["runs"][run], meta["inference_common"]
    with watch_sampler(meta["codebook_dim_d"], _per_scale_bits(fx["gt_bits"], schedule)) as seen:
        out = model.generate(text, lens, schedule, grid, cfg_scale=r["cfg"], tau=r["tau"], top_k=common["top_k"],
                             top_p=common["top_p"])
    gain = abs(r["cfg"]) + abs(1 - r["cfg"])  # CFG: the errors of the two logits it combines, amplified
    assert _within_bar(model, schedule, {key: (torch.cat(seen, dim=1), fx[key])}, gain)
    latent = fx["infer_givenbits.summed_codes"]  # a sum of trilinear-upsampled codes of the given bits
    bar = quantizer_bar(latent, schedule)
    assert max_diff(f"{run}.summed_codes", out["latent"], latent, bar) <= bar


def test_sampled_run_reproduces_official_bits(tiny):
    """Same CPU generator, same seed, one multinomial over (B*l*d, 2) rows per scale: the official draws."""
    model, _, meta, fx, text, lens, schedule, grid = tiny
    r, common = meta["runs"]["sampled"], meta["inference_common"]
    gen = torch.Generator(device="cpu").manual_seed(r["g_seed"])
    with watch_sampler(meta["codebook_dim_d"]) as seen:
        out = model.generate(text, lens, schedule, grid, cfg_scale=r["cfg"], tau=r["tau"], top_k=common["top_k"],
                             top_p=common["top_p"], generator=gen)
    bits = torch.cat([b.flatten(1, 2) for b in out["bits"]], dim=1)  # (B, L, d)
    mismatched = (bits != fx["infer_sampled.bits"].long()).sum().item()
    assert mismatched == 0, f"{mismatched} of {bits.numel()} sampled bits differ"
    max_diff("infer_sampled.bits", bits, fx["infer_sampled.bits"].long(), 0)
    gain = abs(r["cfg"]) + abs(1 - r["cfg"])
    assert _within_bar(model, schedule, {"infer_sampled.sampler_logits": (torch.cat(seen, dim=1),
                                                                          fx["infer_sampled.sampler_logits"])}, gain)
    bar = quantizer_bar(fx["infer_sampled.summed_codes"], schedule)
    assert max_diff("infer_sampled.summed_codes", out["latent"], fx["infer_sampled.summed_codes"], bar) <= bar


def test_full_size_manifests_map_onto_our_module(fixtures_dir):
    """Every transformer manifest (full-size official state_dict: names, shapes) loads onto a meta-device model."""
    checked = 0
    for path in sorted(glob.glob(os.path.join(fixtures_dir, "manifest_*.json"))):
        with open(path) as f:
            manifest = json.load(f)
        entries = manifest["keys"]
        if not any(e["key"] == "word_embed.weight" for e in entries):
            continue  # not a transformer (e.g. the VAE manifest)
        sd = {e["key"]: torch.empty(e["shape"], device="meta") for e in entries}
        model, report = load_infinity(sd)  # raises on any missing / unexpected key or shape mismatch
        assert model.num_params() == manifest["num_parameters"]
        assert len(report["loaded"]) + len(report["ignored"]) == manifest["num_keys"]
        assert report["config"]["depth"] == manifest["model_kwargs"]["depth"]
        checked += 1
    assert checked >= 1
