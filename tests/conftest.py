"""Shared test setup: CPU only, offline, 2 threads, fixed seeds."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)

FIXTURES = os.environ.get("HEAR_FIXTURES", os.path.join(os.path.dirname(__file__), "fixtures", "infinity"))


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
                   "identity": str(i % 3), "split": "train" if i < n_train else "test"}
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
    from common import save_checkpoint

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
