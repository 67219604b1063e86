"""Shared test setup: CPU only, offline, 2 threads (1 with OMP_NUM_THREADS=1), fixed seeds; numeric tolerances."""

import contextlib
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1 if os.environ.get("OMP_NUM_THREADS") == "1" else 2)  # every check must hold at 1 and 2

FIXTURES = os.environ.get("HEAR_FIXTURES", os.path.join(os.path.dirname(__file__), "fixtures", "infinity"))


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    """HEAR_TEST_SEED=N picks pytest-randomly's test order (as --randomly-seed=N would); .ci/run sets it."""
    seed = os.environ.get("HEAR_TEST_SEED")
    if seed and config.pluginmanager.hasplugin("randomly") and config.getoption("randomly_seed") == "default":
        config.option.randomly_seed = int(seed)


def pytest_terminal_summary(terminalreporter, config):
    """The test order, so that a failure that depends on it can be rerun (printed also with -q)."""
    if config.pluginmanager.hasplugin("randomly") and config.getoption("randomly_reorganize"):
        seed = config.getoption("randomly_seed")
        terminalreporter.write_line(f"test order: shuffled with seed {seed}; rerun it with "
                                    f"python3 -m pytest tests -q --randomly-seed={seed}")
    else:
        terminalreporter.write_line("test order: as written (pytest-randomly is not installed or is turned off)")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """Tiny tensors: a second intra-op thread only adds synchronisation, which stalls badly (10x and more) when the
    2-core box is shared; restores the session setting afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fixtures_dir():
    """Folder of the official-code parity fixtures (env HEAR_FIXTURES overrides)."""
    return FIXTURES


# -----------------------------------------------------------------------------
# Numeric tolerances, for every comparison of two fp32 computations of the same thing (ours vs the official code, a
# KV cache vs a full forward, flex vs SDPA masks). Correct implementations differ only in the order they sum, and that
# order changes with the CPU's kernels (vector width, blocking) and the thread count. A dot product of n terms is off
# by about sqrt(n) * u times its scale (u = 2^-24, the fp32 unit roundoff; the roundings of a sum of terms of random
# sign add up like a random walk, n * u is the worst case). Through a stack of `depth` such layers with normalisations
# between them, each layer passes the relative error it receives on about unchanged and adds its own, so
#     bar = u * sqrt(fan_in) * depth * gain * max |reference|
# fan_in: the longest sum of one layer (conv C_in*k*k, linear in_features, attention the number of keys); depth: the
# number of conv / linear layers (layer_stats); gain: a known amplification after the stack (CFG: |cfg| + |1 - cfg|).
# Norm statistics are not counted: torch reduces them in cascades, whose error grows like log n. No safety factor:
# the measured errors lie 10x (encoder, decoder) to 300x below their bars with 1 and 2 threads and every CPU kernel
# set tried (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA, MKL_ENABLE_INSTRUCTIONS from SSE4 to AVX2), and a layout error
# (a wrong interpolation mode, a skipped norm, swapped channels) is an O(1) relative error, 10^4 times the bar
# (test_tokenizer.py::test_decoder_bar_catches_layout_errors).
# Bits, labels and sampled bits are held exact (torch.equal). Quantizer outputs of given features or bits are sums of K
# per-scale area / trilinear resizes, each a sum over at most the H*W latent cells: quantizer_bar. They are not held
# bit-exact: CPUs without AVX2 resize 1-2 ulps off (ATEN_CPU_CAPABILITY=default gives 1.2e-7 and 2.4e-7 here).
U = 2.0**-24  # fp32 unit roundoff
PARITY = {}  # tensor name -> (bar, max |ours - reference|, threads): every compared tensor, printed at the end (-s)


def layer_stats(module):
    """(depth, fan_in) of a conv / linear stack: its number of Conv2d / Linear layers, and their longest sum."""
    layers = [m for m in module.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    return len(layers), max(m.weight[0].numel() for m in layers)


def parity_bar(reference, depth, fan_in, gain=1.0):
    """The tolerance of a tensor computed through `depth` layers summing up to `fan_in` terms (see above)."""
    return U * math.sqrt(fan_in) * depth * gain * reference.abs().max().item()


def quantizer_bar(reference, schedule):
    """The tolerance of a quantizer output over a schedule [(h, w)] ending at the latent size (H, W) (see above)."""
    H, W = schedule[-1]
    return parity_bar(reference, len(schedule), H * W)


def max_diff(name, ours, ref, bar):
    """Record (bar, max |ours - ref|) under `name` and return the difference (shapes must agree exactly)."""
    assert tuple(ours.shape) == tuple(ref.shape), f"{name}: shape {tuple(ours.shape)} vs {tuple(ref.shape)}"
    diff = (ours.double() - ref.double()).abs().max().item()
    PARITY[name] = (bar, max(diff, PARITY.get(name, (0, 0.0))[1]), torch.get_num_threads())
    return diff


@contextlib.contextmanager
def watch_sampler(codebook_dim, teacher_bits=()):
    """HEARTransformer.generate seen at its one draw per scale: inside the block, model.sample_bits is wrapped. Yields
    a list that collects each scale's sampler input, the logits after CFG and 1/tau, as (B, l, 2d) (torch.cat along
    dim 1: (B, L, 2d)). teacher_bits [(B, h, w, d) per scale] replace the draws of the first scales; the sampler still
    draws, so the generator's stream is that of an unwatched run."""
    import model

    real, seen = model.sample_bits, []

    def sample_bits(logits, *args):  # logits (B, l d, 2) -> bits (B, l d)
        bits, k = real(logits, *args), len(seen)
        seen.append(logits.reshape(len(logits), -1, 2 * codebook_dim))  # (B, l, 2d)
        return teacher_bits[k].reshape(bits.shape).to(bits) if k < len(teacher_bits) else bits

    model.sample_bits = sample_bits
    try:
        yield seen
    finally:
        model.sample_bits = real


@pytest.fixture(scope="session", autouse=True)
def parity_report():
    yield
    if PARITY:
        print(f"\nparity (max abs diff against its bar; torch {torch.__version__}, "
              f"{torch.backends.cpu.get_cpu_capability()}):\n  {'tensor':<40} {'bar':>9} {'measured':>9} threads")
        for name, (bar, diff, threads) in PARITY.items():
            print(f"  {name:<40} {bar:9.3g} {diff:9.3g} {threads:>7}")


def write_manifest(folder, n_train=12, n_test=4, size=16, seed=0):
    """A small manifest in the train.py format: random-blob images with a bright 'face' square and its box."""
    import json

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "manifest.jsonl"), "w") as f:
        for i in range(n_train + n_test):
            img = (rng.random((size, size, 3)) * 80).astype(np.uint8)
            x0, y0 = rng.integers(0, size // 2, 2)
            s = size // 2
            img[y0: y0 + s, x0: x0 + s] = rng.integers(120, 255, 3)
            Image.fromarray(img).save(os.path.join(folder, f"{i}.png"))
            colour = ["red", "blue"][i % 2]
            rec = {"path": f"{i}.png", "face_box": [int(x0), int(y0), int(x0 + s), int(y0 + s)],
                   "caption_short": f"a face on {colour}", "caption_long": f"a person with a face on a {colour} wall",
                   "caption_person": f"with a {['red', 'blue'][i % 3 % 2]} face", "identity": str(i % 3),
                   "split": "train" if i < n_train else "test"}
            f.write(json.dumps(rec) + "\n")
    write_vocab(folder, ["a", "face", "on", "red", "blue", "person", "with", "wall"])
    return folder


def write_vocab(folder, words):
    """Word-level caption tokenizer (T5 special-token ids) in <folder>/tokenizer.json."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {w: i for i, w in enumerate(["<pad>", "</s>", "<unk>"] + words)}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    t.save(os.path.join(folder, "tokenizer.json"))


def write_tokenizer_ckpt(path, codebook_dim=8, seed=0):
    """A random tiny BSQ-VAE saved in the train_tokenizer.py checkpoint format (16 px -> 8x8 latent)."""
    import dataclasses

    import tokenizer as tok
    from checkpoint import save_checkpoint

    torch.manual_seed(seed)
    cfg = tok.TokenizerConfig(base_ch=32, ch_mult=(1, 1), num_res_blocks=1, codebook_dim=codebook_dim, patch_size=2)
    save_checkpoint({"model": tok.BSQVAE(cfg).state_dict(), "tokenizer_config": dataclasses.asdict(cfg)}, path)
    return path


@pytest.fixture
def tiny_run(tmp_path):
    """(data_dir, tokenizer ckpt, face encoder ckpt) for train.py --preset=tiny."""
    data = write_manifest(str(tmp_path / "data"))
    return data, write_tokenizer_ckpt(str(tmp_path / "tok.pt")), write_tokenizer_ckpt(str(tmp_path / "face.pt"), seed=1)


@pytest.fixture
def tiny_manifest(tmp_path):
    return write_manifest(str(tmp_path / "data"))


def train_tiny_run(folder):
    """A tiny HEAR run trained 2 steps (train.py --preset=tiny) on a write_manifest folder under `folder` (a Path)
    -> (checkpoint path, (data folder, tokenizer ckpt, face encoder ckpt))."""
    import train
    from common import parse_config

    data = write_manifest(str(folder / "data"))
    tok_ckpt = write_tokenizer_ckpt(str(folder / "tok.pt"))
    face_ckpt = write_tokenizer_ckpt(str(folder / "face.pt"), seed=1)
    train.main(parse_config(train.Config, train.PRESETS, [
        "--preset=tiny", f"--data_dir={data}", f"--tokenizer_ckpt={tok_ckpt}", f"--face_encoder_ckpt={face_ckpt}",
        f"--out_dir={folder / 'run'}", "--device=cpu", "--max_iters=2"]))
    return str(folder / "run" / "ckpt.pt"), (data, tok_ckpt, face_ckpt)
