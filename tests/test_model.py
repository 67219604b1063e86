"""Properties of model.py on a tiny random model: KV cache == full forward, CFG, block-causality, the HEAR adapter
(Eq. 5-7) init and id_scale, loading errors, freezing, and overfitting one batch."""

import re
import warnings

import pytest
import torch

from conftest import layer_stats, max_diff, parity_bar, watch_sampler
from model import CheckpointMismatchError, HEARTransformer, ModelConfig, bitwise_loss, load_infinity, scale_loss_weights
from tokenizer import add_scale, get_schedule, rope_grid, token_offsets

TINY = dict(depth=2, embed_dim=64, num_heads=2, codebook_dim=8, text_channels=128, text_maxlen=8,
            use_global_face=True, global_face_dim=16, use_hf_adapter=True, hf_face_dim=8)
SCHEDULE = get_schedule(1.0, "0.06M")[:4]  # (1,1) (2,2) (4,4) (6,6): L = 57
GRID = rope_grid(1.0)
L = token_offsets(SCHEDULE)[-1]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


def make_model(noise=0.05, **overrides):
    """A tiny model whose every parameter is perturbed (so no gamma or bias is ~0), hf adapter = copy of mat_kv."""
    torch.manual_seed(0)
    model = HEARTransformer(ModelConfig(**{**TINY, **overrides}))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(noise * torch.randn_like(p))
    model.init_hf_adapter_from_backbone()
    return model.eval()


def make_inputs(B=2, d=8, seed=1):
    """Zero-padded text (B, T, Ct) with lengths, global / high-frequency face tokens, random bits per scale."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.tensor([3, 6])[:B]
    valid = torch.arange(6)[None, :, None] < lens[:, None, None]  # (B, T, 1)
    text = torch.randn(B, 6, TINY["text_channels"], generator=g) * valid
    face_global = torch.randn(B, 3, TINY["global_face_dim"], generator=g)
    face_hf = torch.randn(B, 5, TINY["hf_face_dim"], generator=g)
    bits = [torch.randint(0, 2, (B, h, w, d), generator=g) for h, w in SCHEDULE]
    return text, lens, face_global, face_hf, bits


def bar(model, reference, gain=1.0):
    """Tolerance of two summation orders of the same forward (conftest): the attention sums over up to L tokens."""
    depth, fan_in = layer_stats(model)
    return parity_bar(reference, depth, max(fan_in, L), gain)


def teacher_inputs(bits, schedule):
    """Per-scale bits -> the forward's scale_inputs (B, L-1, d) through the pipeline's own next-scale recursion."""
    summed, xs = 0, []
    for k, b in enumerate(bits[:-1]):
        summed, nxt = add_scale(summed, b, schedule, k)
        xs.append(nxt)
    return torch.cat(xs, dim=1)


def test_kv_cache_generation_equals_full_masked_forward():
    model = make_model()
    text, lens, fg, fhf, _ = make_inputs()
    with watch_sampler(TINY["codebook_dim"]) as seen:
        out = model.generate(text, lens, SCHEDULE, GRID, cfg_scale=1.0, face_global=fg, face_hf=fhf, id_scale=0.7,
                             generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(text, lens, teacher_inputs(out["bits"], SCHEDULE), SCHEDULE, GRID, fg, fhf, id_scale=0.7)
    assert full.shape == (2, L, 2 * TINY["codebook_dim"])
    cached = torch.cat(seen, dim=1)  # (B, L, 2d)
    assert max_diff("model: KV-cached logits", cached, full, bar(model, full)) <= bar(model, full)


def test_cfg_combines_cond_and_null_condition_logits():
    """generate's doubled batch = forward on [caption, faces] and on [cfg_uncond[:len], zero faces], combined. The
    unconditional half's adapter output is computed from one key (all its zero face tokens are equal after W_hf),
    the forward with drop_cond attends to all N of them: equal up to rounding."""
    model = make_model()
    text, lens, fg, fhf, bits = make_inputs()
    cfg, tau = 3.0, 0.5
    with watch_sampler(TINY["codebook_dim"], bits) as seen:
        out = model.generate(text, lens, SCHEDULE, GRID, cfg_scale=cfg, tau=tau, face_global=fg, face_hf=fhf)
    x = teacher_inputs(bits, SCHEDULE)
    with torch.no_grad():
        cond = model(text, lens, x, SCHEDULE, GRID, fg, fhf)
        uncond = model(text, lens, x, SCHEDULE, GRID, fg, fhf, drop_cond=torch.ones(2, dtype=torch.bool))
    want, gain = cfg * cond / tau + (1 - cfg) * uncond / tau, abs(cfg) + abs(1 - cfg)
    got = torch.cat(seen, dim=1)  # (B, L, 2d)
    assert max_diff("model: CFG logits", got, want, bar(model, want, gain)) <= bar(model, want, gain)
    assert [torch.equal(a, b) for a, b in zip(out["bits"], bits)] == [True] * len(bits)


def test_hf_adapter_starts_as_copy_of_mat_kv():
    model = HEARTransformer(ModelConfig(**TINY))
    for b in model.blocks:
        assert torch.equal(b.ca.mat_kv_hf.weight, b.ca.mat_kv.weight) and torch.equal(b.ca.v_bias_hf, b.ca.v_bias)


def test_id_scale_zero_is_exactly_the_model_without_adapter():
    hear = make_model()
    with torch.no_grad():  # make the adapter differ from the backbone so that id_scale matters
        for n in hear.hear_parameter_names():
            hear.get_parameter(n).add_(0.1 * torch.randn_like(hear.get_parameter(n)))
    plain = HEARTransformer(ModelConfig(**{**TINY, "use_hf_adapter": False})).eval()
    plain.load_state_dict({k: v for k, v in hear.state_dict().items() if "_hf" not in k})
    text, lens, fg, fhf, bits = make_inputs()
    x = teacher_inputs(bits, SCHEDULE)
    with torch.no_grad():
        ref = plain(text, lens, x, SCHEDULE, GRID, fg)
        assert torch.equal(hear(text, lens, x, SCHEDULE, GRID, fg, fhf, id_scale=0.0), ref)
        assert not torch.allclose(hear(text, lens, x, SCHEDULE, GRID, fg, fhf, id_scale=1.0), ref)
    with watch_sampler(TINY["codebook_dim"], bits) as seen_hear:
        hear.generate(text, lens, SCHEDULE, GRID, face_global=fg, cfg_scale=2.0, face_hf=fhf, id_scale=0.0)
    with watch_sampler(TINY["codebook_dim"], bits) as seen_plain:
        plain.generate(text, lens, SCHEDULE, GRID, face_global=fg, cfg_scale=2.0)
    assert torch.equal(torch.cat(seen_hear, dim=1), torch.cat(seen_plain, dim=1))


def test_per_scale_id_scale_turns_the_adapter_on_from_a_scale():
    """id_scale [0, 0, 1, 1] (pipeline's hf_from_scale=2): scales 1-2 sample from exactly the logits of id_scale 0."""
    model = make_model()
    text, lens, fg, fhf, bits = make_inputs()
    runs = []
    for id_scale in (0.0, [0.0, 0.0, 1.0, 1.0]):
        with watch_sampler(TINY["codebook_dim"], bits) as seen:
            model.generate(text, lens, SCHEDULE, GRID, cfg_scale=2.0, face_global=fg, face_hf=fhf, id_scale=id_scale)
        runs.append(seen)
    assert [torch.equal(a, b) for a, b in zip(*runs)] == [True, True, False, False]
    with pytest.raises(ValueError, match="id_scale needs one value per scale"):
        model.generate(text, lens, SCHEDULE, GRID, face_hf=fhf, id_scale=[1.0, 1.0])


def test_attn_backend_typo_is_a_one_line_error():
    with pytest.raises(ValueError, match=r"^attn_backend='flash': choose auto, flex or sdpa$"):
        ModelConfig(**TINY, attn_backend="flash")


@pytest.mark.parametrize("k", [1, 2, 3])
def test_block_causal_changing_scale_k_leaves_earlier_scales(k):
    model = make_model()
    text, lens, fg, fhf, bits = make_inputs()
    x = teacher_inputs(bits, SCHEDULE)
    offs = token_offsets(SCHEDULE)
    x2 = x.clone()
    x2[:, offs[k] - 1 : offs[k + 1] - 1] += torch.randn_like(x2[:, offs[k] - 1 : offs[k + 1] - 1])  # scale k's input
    with torch.no_grad():
        a = model(text, lens, x, SCHEDULE, GRID, fg, fhf)
        b = model(text, lens, x2, SCHEDULE, GRID, fg, fhf)
    assert torch.equal(a[:, : offs[k]], b[:, : offs[k]])
    assert not torch.allclose(a[:, offs[k] : offs[k + 1]], b[:, offs[k] : offs[k + 1]])


def test_flex_attention_mask_equals_sdpa_mask():
    model = make_model()
    text, lens, fg, fhf, bits = make_inputs()
    x = teacher_inputs(bits, SCHEDULE)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager flex_attention on CPU warns that it is unfused
        ref = model(text, lens, x, SCHEDULE, GRID, fg, fhf)
        model.cfg.attn_backend = "flex"
        got = model(text, lens, x, SCHEDULE, GRID, fg, fhf)
    assert max_diff("model: flex-attention logits", got, ref, bar(model, ref)) <= bar(model, ref)


def test_train_params_modes_train_what_they_say():
    model = make_model()
    everything = {n for n, _ in model.named_parameters()}
    assert set(model.set_trainable("all")) == everything
    adapter = set(model.set_trainable("adapter"))
    # per block: W_Q (weight, bias), W_K/W_V (mat_kv), their V bias; plus W_g (2 Linear layers)
    projections = {n for n in everything if re.search(r"^blocks\.\d+\.ca\.(mat_q\.|mat_kv\.|v_bias$)", n)}
    assert len(projections) == 4 * TINY["depth"] and projections <= adapter
    trainable = model.set_trainable("hear")
    assert trainable and all(re.search(r"face_global_proj|face_hf_proj|mat_kv_hf|v_bias_hf", n) for n in trainable)
    assert len(trainable) == 4 + 2 * TINY["depth"]
    assert adapter == set(trainable) | projections | {n for n in everything if n.startswith("text_proj_for_ca.")}
    text, lens, fg, fhf, bits = make_inputs()
    model(text, lens, teacher_inputs(bits, SCHEDULE), SCHEDULE, GRID, fg, fhf).square().mean().backward()
    assert all((p.grad is not None) == p.requires_grad for p in model.parameters())


def _official_names(model):
    """Our state_dict under the official names (2 blocks per chunk) plus the zero_k_bias buffers."""
    sd = {re.sub(r"^blocks\.(\d+)\.", lambda m: f"block_chunks.{int(m[1]) // 2}.module.{int(m[1]) % 2}.", k): v
          for k, v in model.state_dict().items()}
    for k in [k for k in sd if k.endswith("v_bias") and "_hf" not in k]:
        sd[k.replace("v_bias", "zero_k_bias")] = torch.zeros_like(sd[k])
    return sd


def test_load_infinity_round_trip_and_hear_overrides():
    plain = make_model(use_global_face=False, use_hf_adapter=False)
    model, report = load_infinity(_official_names(plain), use_hf_adapter=True, hf_face_dim=8)
    assert report["newly_initialized"] == model.hear_parameter_names()
    for k, v in plain.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    for b in model.blocks:
        assert torch.equal(b.ca.mat_kv_hf.weight, b.ca.mat_kv.weight) and torch.equal(b.ca.v_bias_hf, b.ca.v_bias)


@pytest.mark.parametrize("edit, words", [
    (lambda sd: sd.pop("head.bias"), "1 missing: head.bias"),
    (lambda sd: sd.__setitem__("extra.weight", torch.zeros(1)), "1 unexpected: extra.weight"),
    (lambda sd: sd.__setitem__("head.bias", torch.zeros(3)), "head.bias [3] vs [16]"),
    (lambda sd: sd.pop("word_embed.weight"), "cannot infer the model sizes"),
])
def test_load_infinity_rejects_bad_weights_in_one_line(edit, words):
    sd = _official_names(make_model(use_global_face=False, use_hf_adapter=False))
    edit(sd)
    with pytest.raises(CheckpointMismatchError) as err:
        load_infinity(sd)
    assert words in str(err.value) and "\n" not in str(err.value)
    assert isinstance(err.value, ValueError)


def test_grad_checkpointing_gives_the_same_gradients():
    text, lens, fg, fhf, bits = make_inputs()
    grads = []
    for flag in (False, True):
        model = make_model(grad_checkpointing=flag).train()
        model(text, lens, teacher_inputs(bits, SCHEDULE), SCHEDULE, GRID, fg, fhf).square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])


def test_overfits_one_batch():
    """Fresh init (official special_init), HEAR paths on, all parameters trained, IVC loss with scale reweighting."""
    torch.manual_seed(0)
    model = HEARTransformer(ModelConfig(**TINY)).train()
    text, lens, fg, fhf, bits = make_inputs()
    x, target = teacher_inputs(bits, SCHEDULE), torch.cat([b.flatten(1, 2) for b in bits], dim=1)  # (B, L, d)
    weights = scale_loss_weights(SCHEDULE)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for step in range(300):
        logits = model(text, lens, x, SCHEDULE, GRID, fg, fhf)
        loss = bitwise_loss(logits, target, weights)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        accuracy = (logits.view(*target.shape, 2).argmax(-1) == target).float().mean().item()
        if accuracy > 0.99:
            break
    assert accuracy > 0.99, (step, loss.item(), accuracy)
