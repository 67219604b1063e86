"""
Pretrain the tiny T5 text encoder of synthfaces on captions alone, by masked-word prediction: the synthfaces stand-in
for the paper's pretrained Flan-T5. The text-to-image base then reads it frozen (train.py --text_init=<ckpt>
--train_text=False), as HEAR reads its Flan-T5.

  python train_text_encoder.py --data_dir=data/synthfaces/out            (writes out/text_encoder/ckpt.pt)
  python train_text_encoder.py --init_from=resume                        (go on from the last checkpoint)

Why: trained jointly with the image model from nothing, the text encoder learns which words a caption holds but not
which word goes with which: the base then paints the right colours on the wrong things (the shirt's colour on the
wall, "lit from the left" as "face on the left"; docs/foundation.md). Predicting a hidden word from the words around
it is what a language model learns first, and it makes every word's feature carry its neighbours.

The objective is BERT's masking on the encoder alone (T5's span corruption needs a decoder that would be thrown away):
15% of the caption's word tokens are chosen, 80% of those replaced by <unk> (the word-level vocabulary has no mask
token), 10% by a random word, 10% kept, and a linear head predicts the original word from the encoder's output there.
The head is discarded; the checkpoint holds the encoder in the layout train.py and pipeline.load_run read.
"""

import dataclasses
import os
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from checkpoint import init_after_restart, load_checkpoint, save_checkpoint
from common import UserError, cli, log, lr_schedule, resolve_device, run_info, save_config, seeded_generator
from data.manifest import caption, read_manifest
from pipeline import build_text_encoder, read_vocab

PAD, EOS, MASK = 0, 1, 2  # prepare.py's vocabulary: <pad>, </s>, <unk> (the mask token here)


@dataclasses.dataclass
class Config:
    preset: str = "synthfaces"  # preset name (recorded in the checkpoint)
    data_dir: str = "data/synthfaces/out"  # manifest + tokenizer.json: the training split's captions are the corpus
    out_dir: str = "out/text_encoder"  # ckpt.pt, config.json, log.txt
    init_from: str = "scratch"  # scratch | resume
    text_channels: int = 128  # Ct (train.py's tiny T5 sizes)
    text_layers: int = 2  # T5 layers
    text_heads: int = 4  # T5 heads
    batch_size: int = 64  # captions per step
    max_iters: int = 3000  # optimizer steps
    learning_rate: float = 1e-3  # AdamW peak lr
    warmup_iters: int = 100  # linear warmup
    min_lr_ratio: float = 0.1  # the end of the cosine decay, as a fraction of the peak
    weight_decay: float = 0.01  # AdamW wd
    mask_prob: float = 0.15  # share of word tokens chosen per caption (BERT)
    seed: int = 0  # init and each step's draws (a function of the step: resume == uninterrupted)
    log_interval: int = 200  # steps between log lines
    save_interval: int = 1000  # steps between checkpoints (and at the end)
    device: str = "auto"  # auto | cpu | cuda


PRESETS = {"synthfaces": {},
           "tiny": {"text_layers": 1, "text_heads": 2, "batch_size": 8, "max_iters": 6,
                    "warmup_iters": 1, "log_interval": 1, "save_interval": 3}}


def caption_ids(cfg, caption_tokenizer):
    """Every short and long caption of the training split, and every short one with its person's looks where the
    manifest has them (the base's captions, train.py --person_caption_prob) -> ids (N, T) padded with 0, mask (N, T)."""
    records = read_manifest(cfg.data_dir, "train")
    captions = [caption(r, short) for r in records for short in (True, False)]
    captions += [caption(r, True, True) for r in records if r.get("caption_person")]
    ids = caption_tokenizer(captions, padding=True, return_tensors="pt")
    return ids["input_ids"], ids["attention_mask"]


def mask_words(ids, mask, generator, mask_prob, vocab_size):
    """BERT masking -> (inputs (B, T), chosen (B, T) bool): mask_prob of the word tokens (not padding or </s>) are
    chosen; of those 80% become MASK, 10% a random word, 10% stay as they are. The loss is read at `chosen` only."""
    u = torch.rand((2, *ids.shape), generator=generator)
    chosen = (u[0] < mask_prob) & (mask == 1) & (ids != EOS)
    inputs = torch.where(chosen & (u[1] < 0.8), MASK, ids)
    random_word = torch.randint(MASK + 1, vocab_size, ids.shape, generator=generator)
    return torch.where(chosen & (u[1] >= 0.8) & (u[1] < 0.9), random_word, inputs), chosen


def main(cfg):
    cfg = dataclasses.replace(cfg, init_from=init_after_restart(cfg.init_from, cfg.out_dir))
    if cfg.init_from not in ("scratch", "resume"):
        raise UserError(f"--init_from={cfg.init_from!r}: use scratch or resume")
    device = resolve_device(cfg.device)
    log(save_config(cfg, cfg.out_dir), cfg.out_dir)
    log(run_info(device), cfg.out_dir)
    torch.manual_seed(cfg.seed)
    vocab = read_vocab(cfg.data_dir)
    encoder, caption_tokenizer, _ = build_text_encoder("tiny", vocab, cfg.text_channels, cfg.text_layers,
                                                       cfg.text_heads)
    encoder = encoder.to(device)
    head = torch.nn.Linear(cfg.text_channels, len(caption_tokenizer)).to(device)  # word logits; dropped afterwards
    params = list(encoder.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    step = 0
    if cfg.init_from == "resume":
        ckpt = load_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"), device)
        encoder.load_state_dict(ckpt["text_encoder"])
        head.load_state_dict(ckpt["head"])
        opt.load_state_dict(ckpt["optimizer"])
        step = ckpt["step"]
        log(f"resumed from step {step}", cfg.out_dir)
    ids, mask = caption_ids(cfg, caption_tokenizer)  # (N, T) each, on the CPU: each step's draws are made there
    log(f"tiny T5 text encoder {sum(p.numel() for p in encoder.parameters()) / 1e6:.2f}M params, {len(ids)} captions, "
        f"vocabulary {len(caption_tokenizer)}", cfg.out_dir)
    encoder.train()
    window, t0 = [], time.time()
    for step in tqdm(range(step, cfg.max_iters), initial=step, total=cfg.max_iters, desc="text encoder"):
        g = seeded_generator(cfg.seed, step)  # this step's captions and masks, whatever ran before
        pick = torch.randint(0, len(ids), (cfg.batch_size,), generator=g)
        inputs, chosen = mask_words(ids[pick], mask[pick], g, cfg.mask_prob, len(caption_tokenizer))
        for group in opt.param_groups:
            group["lr"] = lr_schedule(step, cfg.learning_rate, cfg.warmup_iters, cfg.max_iters, cfg.min_lr_ratio)
        inputs, chosen, attn, target = (t.to(device) for t in (inputs, chosen, mask[pick], ids[pick]))
        features = encoder(input_ids=inputs, attention_mask=attn).last_hidden_state  # (B, T, Ct)
        logits = head(features[chosen])  # (n, vocab); n = 0 is possible with a few short captions: a zero loss then
        loss = F.cross_entropy(logits, target[chosen]) if chosen.any() else features.sum() * 0
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        hits = (logits.argmax(-1) == target[chosen]).float()
        window.append((loss.item(), hits.mean().item() if len(hits) else 0.0))
        done = step + 1
        if done % cfg.log_interval == 0 or done == cfg.max_iters:
            loss_avg, acc = (sum(w[k] for w in window) / len(window) for k in range(2))
            log(f"step {done}/{cfg.max_iters} | loss {loss_avg:.4f} | masked-word accuracy {acc:.3f} | "
                f"{time.time() - t0:.0f} s", cfg.out_dir)
            window = []
        if done % cfg.save_interval == 0 or done == cfg.max_iters:
            save_checkpoint({"text_encoder": encoder.state_dict(), "head": head.state_dict(),
                             "caption_tokenizer": caption_tokenizer.backend_tokenizer.to_str(),
                             "optimizer": opt.state_dict(), "config": dataclasses.asdict(cfg), "step": done},
                            os.path.join(cfg.out_dir, "ckpt.pt"))


if __name__ == "__main__":
    cli(main, Config, PRESETS)
