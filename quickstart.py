"""
The whole embedded pipeline in one command, on a CPU: synthfaces data, its judge, the tokenizer, the face encoder,
the HEAR transformer, pictures of held-out identities and the evaluation tables.

  python quickstart.py                       # runs what is missing: a re-run after a kill continues
  python quickstart.py --force=True          # everything again, from scratch

Each stage runs the command a user would type for it (printed, and logged to <out_dir>/quickstart/<stage>.log), one
line per stage with its wall time. A stage is skipped when its output exists and is complete: a training stage when
its checkpoint has reached its max_iters (a checkpoint short of that resumes with --init_from=resume, exactly).
"""

import dataclasses
import os
import shutil
import subprocess
import sys
import time

from checkpoint import load_checkpoint
from common import UserError, cli, log

ROOT = os.path.dirname(os.path.abspath(__file__))  # the stage commands run from the repository root


@dataclasses.dataclass
class Config:
    preset: str = "synthfaces"  # synthfaces (the quick start) | tiny (every stage at toy size, for tests)
    data_dir: str = "data/synthfaces/out"  # the synthfaces data and its judge
    out_dir: str = "out"  # tokenizer/, face_encoder/, hear/ and quickstart/ (logs, pictures, tables) go here
    force: bool = False  # rerun every stage (deletes the previous outputs of the stages first)
    device: str = "auto"  # auto | cpu | cuda (passed to every stage)


PRESETS = {"synthfaces": {}, "tiny": {"data_dir": "out/quickstart_tiny/data", "out_dir": "out/quickstart_tiny"}}

# per-stage presets of the two quick-start sizes
STAGE_PRESETS = {
    "synthfaces": dict(prepare="synthfaces", judge="synthfaces", tokenizer="synthfaces", face="synthfaces_face",
                       train="synthfaces", eval=[]),
    "tiny": dict(prepare="tiny", judge="tiny", tokenizer="tiny", face="tiny", train="tiny",
                 eval=["--image_size=16", "--max_images=16", "--prompts_per_identity=1", "--gallery_ids=2"]),
}
TINY_FACE = ["--face_mask=True", "--id_weight=0.1", "--id_net=judge"]  # the tiny preset's face-encoder terms


def stages(cfg):
    """[(name, command, output that marks it done)] in pipeline order."""
    p, py, d, o = STAGE_PRESETS[cfg.preset], sys.executable, cfg.data_dir, cfg.out_dir
    tok, face, hear, qs = (os.path.join(o, n) for n in ("tokenizer", "face_encoder", "hear", "quickstart"))
    dev = f"--device={cfg.device}"
    return [
        ("data", [py, "-m", "data.synthfaces.prepare", f"--preset={p['prepare']}", f"--out_dir={d}", "--sheet_copy="],
         os.path.join(d, "meta.json")),
        ("judge", [py, "-m", "data.synthfaces.judge", f"--preset={p['judge']}", f"--data_dir={d}"],
         os.path.join(d, "judge.pt")),
        ("tokenizer", [py, "train_tokenizer.py", f"--preset={p['tokenizer']}", f"--data_dir={d}", f"--out_dir={tok}",
                       dev], os.path.join(tok, "ckpt.pt")),
        ("face encoder", [py, "train_tokenizer.py", f"--preset={p['face']}", f"--data_dir={d}", f"--out_dir={face}",
                          f"--init_from={tok}/ckpt.pt", dev] + (TINY_FACE if cfg.preset == "tiny" else []),
         os.path.join(face, "ckpt.pt")),
        ("transformer", [py, "train.py", f"--preset={p['train']}", f"--data_dir={d}", f"--out_dir={hear}",
                         f"--tokenizer_ckpt={tok}/ckpt.pt", f"--face_encoder_ckpt={face}/ckpt.pt", dev],
         os.path.join(hear, "ckpt.pt")),
        ("pictures", [py, "eval.py", "--what=gallery", f"--ckpt={hear}/ckpt.pt", f"--data_dir={d}",
                      f"--out={qs}/gallery.png", dev] + p["eval"], os.path.join(qs, "gallery.png")),
        ("tokenizer table", [py, "eval.py", "--what=tokenizer", f"--ckpts={tok}/ckpt.pt,{face}/ckpt.pt",
                             "--names=tokenizer,face encoder", f"--data_dir={d}", f"--judge={d}/judge.pt",
                             f"--out={qs}/tokenizer_table.md", dev] + p["eval"],
         os.path.join(qs, "tokenizer_table.md")),
        ("generation table", [py, "eval.py", "--what=generation", f"--ckpt={hear}/ckpt.pt", f"--data_dir={d}",
                              f"--judge={d}/judge.pt", f"--out={qs}/generation_table.md", dev] + p["eval"],
         os.path.join(qs, "generation_table.md")),
    ]


def progress(output):
    """-> "done", "partial" (a checkpoint short of its max_iters: resume it) or "missing"."""
    if not os.path.isfile(output):
        return "missing"
    if not output.endswith("ckpt.pt"):
        return "done"
    ckpt = load_checkpoint(output)
    return "done" if ckpt["step"] >= ckpt["config"]["max_iters"] else "partial"


def run_stage(i, n, name, command, output, log_dir):
    """Run one stage as its own process; its output goes to <log_dir>/<name>.log -> seconds it took."""
    state = progress(output)
    if state == "done":
        log(f"[{i}/{n}] {name:<17} done already ({output})")
        return 0.0
    if state == "partial":
        command = command + ["--init_from=resume"]
    path = os.path.join(log_dir, name.replace(" ", "_") + ".log")
    t0 = time.time()
    with open(path, "w") as f:
        f.write(" ".join(command) + "\n")
        f.flush()
        code = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    seconds = time.time() - t0
    if code != 0:
        with open(path) as f:
            tail = f.read().splitlines()[-15:]
        print("\n".join(tail))
        raise UserError(f"stage '{name}' failed (exit {code}); its log: {path}; fix and rerun python quickstart.py")
    log(f"[{i}/{n}] {name:<17} {int(seconds // 60)} min {seconds % 60:4.1f} s   {' '.join(command[1:])}")
    return seconds


def main(cfg):
    if cfg.preset not in STAGE_PRESETS:
        raise UserError(f"--preset={cfg.preset!r}: choose {' or '.join(STAGE_PRESETS)}")
    cfg = dataclasses.replace(cfg, data_dir=os.path.abspath(cfg.data_dir), out_dir=os.path.abspath(cfg.out_dir))
    todo = stages(cfg)
    if cfg.force:
        for path in [cfg.data_dir] + [os.path.join(cfg.out_dir, n) for n in ("tokenizer", "face_encoder", "hear",
                                                                           "quickstart")]:
            shutil.rmtree(path, ignore_errors=True)
    log_dir = os.path.join(cfg.out_dir, "quickstart")
    os.makedirs(log_dir, exist_ok=True)
    total = sum(run_stage(i + 1, len(todo), *stage, log_dir) for i, stage in enumerate(todo))
    log(f"total {int(total // 60)} min {total % 60:.0f} s (stages run now; skipped ones count 0)")
    for name in ("tokenizer_table.md", "generation_table.md"):
        with open(os.path.join(log_dir, name)) as f:
            log(f"\n{f.read().strip()}")
    log(f"\npictures: {log_dir}/gallery.png (rows: held-out identities; reference, then one sample per prompt)\n"
        f"          {log_dir}/gallery_scales.png (Fig. 8: the first k scales decoded, k = 1..K)\n"
        f"stage logs: {log_dir}/*.log")
    return total


if __name__ == "__main__":
    cli(main, Config, PRESETS)
