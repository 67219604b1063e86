"""
Train the BSQ-VAE tokenizer, or fine-tune a copy of it into HEAR's high-frequency face encoder (paper section 3.2).

  from scratch (CPU, synthfaces):  python train_tokenizer.py --preset=synthfaces
  face encoder (Eq. (1)-(2)):      python train_tokenizer.py --preset=synthfaces_face   (from the shipped tokenizer)
  official VAE -> face encoder:    torchrun --standalone --nproc_per_node=8 train_tokenizer.py --preset=infinity_face \
                                     --init_from=infinity:weights/infinity_vae_d32reg.pth --data_dir=data/faces
  sharpen the decoder only:        python train_tokenizer.py --init_from=<ckpt.pt> --train_params=decoder
                                     (the codes stay bit-identical: transformers trained on them need no retraining)
  resume any run:                  python train_tokenizer.py --preset=... --init_from=resume
  (SIGTERM / Ctrl-C, a NaN loss, a lost rank: as in train.py, see checkpoint.Faults)

Both modes share one loss (face_loss.CompositeLoss): from scratch it is L1 + L2 + VQ (+ LPIPS) on the whole
image; the face-encoder presets weight the pixel terms by the face mask (--face_mask=True, Eq. 2) and give the
DINOv2-alignment and identity terms a weight (Eq. 1); every term has its own weight (0 = off). The generation
tokenizer is never overwritten: the face encoder has its own out_dir.
"""

import dataclasses
import os
import time

import torch
from tqdm import tqdm

import face_loss as fl
import tokenizer as tok
from checkpoint import Faults, init_after_restart, poison, rng_state, save_checkpoint, set_rng_state
from common import UserError, autocast, cli, log, lr_schedule, run_info, save_config, setup_device
from data.manifest import epoch_batches, load_example, read_manifest
from metrics import evaluate_tokenizer
from pipeline import load_tokenizer


@dataclasses.dataclass
class Config:
    preset: str = "synthfaces"  # preset name (recorded in the checkpoint)
    data_dir: str = "data/synthfaces/out"  # folder (or file) of the JSONL manifest, see train.py
    out_dir: str = "out/tokenizer"  # checkpoints, config.json, log.txt, recon grid
    init_from: str = "scratch"  # scratch | resume | <our ckpt.pt> (weights only) | infinity:<official vae .pth>
    train_params: str = "all"  # all | decoder (the encoder frozen: every image keeps its codes, see build)
    # model (ignored when weights are loaded: the architecture comes from the checkpoint)
    base_ch: int = 32  # channels of the first level
    ch_mult: tuple = (1, 1, 2, 2)  # channel multiplier per level
    num_res_blocks: int = 1  # ResnetBlocks per encoder level
    codebook_dim: int = 32  # d bits per token
    patch_size: int = 8  # pixels per latent token side
    image_size: int = 64  # training/eval resolution (square)
    # optimisation
    batch_size: int = 16  # global batch (split over DDP ranks)
    max_iters: int = 350  # optimizer steps (synthfaces: what the from-scratch quick start's time bound leaves)
    learning_rate: float = 2e-3  # AdamW peak lr
    min_lr_ratio: float = 0.1  # cosine decay floor as a fraction of the peak
    warmup_iters: int = 50  # linear warmup steps
    weight_decay: float = 0.0  # AdamW weight decay
    grad_clip: float = 1.0  # global grad-norm clip (0 = off)
    # Eq. (1) weights (a weight of 0 turns a term off)
    l1_weight: float = 0.2  # lambda_L1
    l2_weight: float = 1.0  # lambda_L2
    vq_weight: float = 1.0  # lambda_VQ (commitment + entropy regularisers of BSQ)
    lpips_weight: float = 0.0  # lambda_lpips (needs torchvision VGG16 weights in the torch cache)
    dino_weight: float = 0.0  # the paper's lambda_clip: DINOv2 patch-feature alignment (needs dino_path)
    id_weight: float = 0.0  # lambda_adaface: identity loss (needs id_net)
    commit_weight: float = 0.25  # inside L_VQ: commitment weight
    entropy_weight: float = 0.1  # inside L_VQ: entropy-penalty weight
    # face encoder (Eq. 2)
    face_mask: bool = False  # weight the pixel losses by the face mask of Eq. (2) (alpha inside the box, 1 outside)
    face_alpha: float = 2.0  # alpha of Eq. (2) inside the face box
    dino_path: str = ""  # local folder of a transformers Dinov2Model (e.g. dinov2-base), for dino_weight
    id_net: str = ""  # judge (the synthfaces judge's loss net, <data_dir>/judge.pt) | judge:<judge.pt> | IResNet path
    # runtime
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "bfloat16"  # autocast dtype on CUDA (CPU always fp32)
    compile: bool = False  # torch.compile the VAE
    seed: int = 0  # data order and init
    log_interval: int = 50  # steps between log lines
    eval_interval: int = 350  # steps between held-out evaluations + checkpoints
    eval_images: int = 256  # held-out images used for PSNR/SSIM
    nan_policy: str = "stop"  # a NaN / inf loss: stop (error, last checkpoint kept) | skip (drop the update, count it)
    dist_timeout_s: float = 600.0  # DDP: seconds a collective waits for a lost rank (rank 0 evaluates meanwhile)


PRESETS = {
    "synthfaces": {},
    "synthfaces_face": {"out_dir": "out/face_encoder", "init_from": "weights/synthfaces/tokenizer.pt",
                        "id_net": "judge:weights/synthfaces/judge.pt", "face_mask": True, "id_weight": 0.1,
                        "max_iters": 60, "learning_rate": 3e-4, "warmup_iters": 10, "eval_interval": 60,
                        "log_interval": 25},
    "infinity_face": {"out_dir": "out/face_encoder_2b", "init_from": "infinity:weights/infinity_vae_d32reg.pth",
                      "image_size": 256, "batch_size": 64, "max_iters": 20000, "learning_rate": 1e-5,
                      "face_mask": True, "lpips_weight": 0.5, "dino_weight": 0.1, "id_weight": 0.1,
                      "dino_path": "weights/dinov2-base", "id_net": "weights/adaface_ir101_webface12m.ckpt",
                      "compile": True, "eval_interval": 2000, "log_interval": 100},
    "tiny": {"base_ch": 32, "ch_mult": (1, 1), "patch_size": 2, "image_size": 16, "batch_size": 4, "max_iters": 4,
             "eval_interval": 2, "log_interval": 1, "eval_images": 4, "warmup_iters": 1},
}


def build_tokenizer(cfg):
    """-> (vae, state of a resumed run or None)."""
    if cfg.init_from == "scratch":
        arch = tok.TokenizerConfig(cfg.base_ch, cfg.ch_mult, cfg.num_res_blocks, cfg.codebook_dim, cfg.patch_size)
        return tok.BSQVAE(arch), None
    spec = os.path.join(cfg.out_dir, "ckpt.pt") if cfg.init_from == "resume" else cfg.init_from
    vae, ckpt = load_tokenizer(spec)  # infinity:<official .pth> or our checkpoint; returned frozen
    return vae.requires_grad_(True), (ckpt if cfg.init_from == "resume" else None)


def build_id_net(cfg, device):
    """The frozen recognizer of the identity loss: the synthfaces judge's loss network, or an IResNet/AdaFace."""
    if cfg.id_net == "judge" or cfg.id_net.startswith("judge:"):
        from data.synthfaces.judge import load_judge

        path = cfg.id_net.removeprefix("judge:") if ":" in cfg.id_net else os.path.join(cfg.data_dir, "judge.pt")
        if not os.path.isfile(path):
            raise UserError(f"{path} not found; train it with python -m data.synthfaces.judge")
        return JudgeIdentity(load_judge(path, device))
    return fl.CropEmbedder(fl.load_iresnet(cfg.id_net))


class JudgeIdentity(torch.nn.Module):
    """The synthfaces judge's loss network (never its evaluator) as the identity term, with the judge's own crop."""

    def __init__(self, judge):
        super().__init__()
        self.judge = judge

    def forward(self, images, boxes):
        return self.judge.embed(self.judge.crop(images, boxes.to(images.device)), "loss")


def build_loss(cfg, vae, device):
    """Eq. (1) with the networks each active term needs; terms whose network is unavailable stop with an error."""
    weights = {"l1": cfg.l1_weight, "l2": cfg.l2_weight, "vq": cfg.vq_weight, "lpips": cfg.lpips_weight,
               "dino": cfg.dino_weight, "id": cfg.id_weight}
    lpips_net = fl.make_lpips() if cfg.lpips_weight > 0 else None
    dino = None
    if cfg.dino_weight > 0:
        from transformers import Dinov2Model

        if not os.path.isdir(cfg.dino_path):
            raise UserError(f"--dino_path={cfg.dino_path!r} is not a local Dinov2Model folder (or set --dino_weight=0)")
        dino = fl.DinoAlign(Dinov2Model.from_pretrained(cfg.dino_path, local_files_only=True), vae.cfg.codebook_dim)
    id_net = build_id_net(cfg, device) if cfg.id_weight > 0 else None
    alpha = cfg.face_alpha if cfg.face_mask else 1.0  # Eq. (2)
    return fl.CompositeLoss(weights, lpips_net, dino, id_net, alpha=alpha).to(device)


def build(cfg, dist):
    """-> (vae, loss, optimizer, start step, steps skipped so far): new, fine-tuned from a checkpoint, or resumed;
    identical on every rank."""
    if cfg.train_params not in ("all", "decoder"):
        raise UserError(f"--train_params={cfg.train_params!r}: use all or decoder")
    vae, resumed = build_tokenizer(cfg)
    vae = vae.to(dist.device).train()
    if cfg.train_params == "decoder":  # BSQ has no weights: a frozen encoder gives every image the same codes, so
        vae.encoder.requires_grad_(False)  # transformers trained on them stay valid while the decoder sharpens
    loss_fn = build_loss(cfg, vae, dist.device)
    params = [p for p in list(vae.parameters()) + list(loss_fn.parameters()) if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
    step, skipped = 0, 0
    if resumed is not None:
        opt.load_state_dict(resumed["optimizer"])
        loss_fn.load_state_dict(resumed["loss"], strict=False)
        set_rng_state(resumed["rng"])
        step, skipped = resumed["step"], resumed.get("skipped_steps", 0)
        log(f"resumed from step {step}", cfg.out_dir, dist.master)
    if dist.world_size > 1:  # one set of weights: rank 0's (a fresh DinoAlign projection too), broadcast to all
        for t in list(vae.state_dict().values()) + list(loss_fn.state_dict().values()):
            torch.distributed.broadcast(t, src=0)
    if cfg.compile:  # in place, so state_dict keys stay unprefixed
        vae.encoder.compile()
        vae.decoder.compile()
    return vae, loss_fn, opt, step, skipped


def average_gradients(params, world_size):
    """Data parallel: sum the gradients over ranks, then divide (gloo has no ReduceOp.AVG), as one flat all-reduce.
    The loss needs the encoder features, the quantizer output and the decoder output of one pass, so the gradients
    are averaged here rather than by a DDP wrapper around one module."""
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.flatten() for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= world_size
    for g, part in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(part.view_as(g))


def train_step(vae, loss_fn, opt, params, x, boxes, schedule, cfg, faults, step):
    """Optimizer step `step` (1-based) on this rank's images x (B, 3, H, W) -> (loss, {term: value}); a non-finite
    loss stops the run or, with nan_policy=skip, returns before backward (checkpoint.Faults)."""
    with autocast(x.device, cfg.dtype):
        features, q, recon = vae(x, schedule)  # (B, d, h, w), quantizer outputs, (B, 3, H, W)
    aux = tok.bsq_aux_loss(q["inputs"], commit_weight=cfg.commit_weight, entropy_weight=cfg.entropy_weight)
    loss, terms = loss_fn(recon.float(), x, boxes, aux["aux"], features)  # Eq. (1)
    loss = poison(loss, step)
    if faults.skip(loss.item(), step):
        return loss, terms
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if faults.dist.world_size > 1:
        average_gradients(params, faults.dist.world_size)
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    opt.step()
    return loss, terms


def save(vae, loss_fn, opt, cfg, step, metrics, skipped):
    save_checkpoint({"model": vae.state_dict(), "optimizer": opt.state_dict(), "loss": loss_fn.state_dict(),
                     "tokenizer_config": dataclasses.asdict(vae.cfg), "config": dataclasses.asdict(cfg),
                     "step": step, "rng": rng_state(), "metrics": metrics, "skipped_steps": skipped},
                    os.path.join(cfg.out_dir, "ckpt.pt"))


def evaluate_and_save(vae, loss_fn, opt, cfg, step, faults, test_recs):
    """Rank 0 evaluates and saves at each eval_interval and at the end, and saves without evaluating when a signal
    asked the run to stop; then every rank exits on that signal (checkpoint.Faults)."""
    master = faults.dist.master
    if master and (step % cfg.eval_interval == 0 or step == cfg.max_iters):
        metrics = evaluate_tokenizer(vae, test_recs, cfg.image_size, faults.dist.device,
                                     grid_path=os.path.join(cfg.out_dir, "recon.png"))
        log("eval (held-out identities) | " + " | ".join(f"{k} {v:.4f}" for k, v in metrics.items()), cfg.out_dir)
        save(vae, loss_fn, opt, cfg, step, metrics, faults.skipped)
    elif master and faults.signum:
        save(vae, loss_fn, opt, cfg, step, None, faults.skipped)
    faults.exit_if_signalled(step)


def main(cfg):
    cfg = dataclasses.replace(cfg, init_from=init_after_restart(cfg.init_from, cfg.out_dir))
    dist = setup_device(cfg.device, cfg.dist_timeout_s)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    if dist.master:
        log(save_config(cfg, cfg.out_dir), cfg.out_dir)
        log(run_info(dist.device), cfg.out_dir)
    train_recs = read_manifest(cfg.data_dir, "train")
    test_recs = read_manifest(cfg.data_dir, "test")[: cfg.eval_images]
    if cfg.batch_size % dist.world_size:
        raise UserError(f"--batch_size={cfg.batch_size} must divide by the world size {dist.world_size}")
    vae, loss_fn, opt, step, skipped = build(cfg, dist)
    faults = Faults(cfg.nan_policy, dist, cfg.out_dir)
    faults.skipped = skipped
    params = [p for p in list(vae.parameters()) + list(loss_fn.parameters()) if p.requires_grad]
    schedule = tok.small_schedule(cfg.image_size // vae.cfg.patch_size, cfg.image_size // vae.cfg.patch_size)
    log(f"tokenizer {sum(p.numel() for p in vae.parameters()) / 1e6:.2f}M params, schedule {schedule}, "
        f"active loss terms {loss_fn.active()} (alpha {loss_fn.alpha})", cfg.out_dir, dist.master)
    size, share = (cfg.image_size, cfg.image_size), cfg.batch_size // dist.world_size
    per_epoch = len(epoch_batches(len(train_recs), cfg.batch_size, 0, cfg.seed))
    t0, bar = time.time(), tqdm(total=cfg.max_iters, initial=step, disable=not dist.master, desc="tokenizer")
    with bar, faults:  # the bar closes before an error line is printed
        while step < cfg.max_iters:
            # the data position is the step itself, so resume is exact; rank r takes its share of the global batch
            batch = epoch_batches(len(train_recs), cfg.batch_size, step // per_epoch, cfg.seed)[step % per_epoch]
            examples = [load_example(train_recs[i], size) for i in batch[dist.rank * share: (dist.rank + 1) * share]]
            x, boxes = torch.stack([e[0] for e in examples]).to(dist.device), torch.stack([e[1] for e in examples])
            for group in opt.param_groups:
                group["lr"] = lr_schedule(step, cfg.learning_rate, cfg.warmup_iters, cfg.max_iters, cfg.min_lr_ratio)
            loss, terms = train_step(vae, loss_fn, opt, params, x, boxes, schedule, cfg, faults, step + 1)
            step += 1
            bar.update(1)
            if step % cfg.log_interval == 0 or step == cfg.max_iters:
                parts = " ".join(f"{k} {v.item():.4f}" for k, v in terms.items())
                log(f"step {step}/{cfg.max_iters} | loss {loss.item():.4f} | {parts} | "
                    f"lr {opt.param_groups[0]['lr']:.2e} | "
                    f"{cfg.log_interval * cfg.batch_size / (time.time() - t0):.1f} img/s", cfg.out_dir, dist.master)
                t0 = time.time()
            evaluate_and_save(vae, loss_fn, opt, cfg, step, faults, test_recs)
    if dist.world_size > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    cli(main, Config, PRESETS)
