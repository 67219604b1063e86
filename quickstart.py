"""
The embedded pipeline in one command, on a CPU. By default it starts from the shipped synthfaces foundation
(weights/synthfaces: a pretrained tokenizer, text-to-image base model and judge, as the paper starts from the Infinity
VAE, Infinity-2B and pretrained face recognisers) and trains what HEAR adds: the face encoder (Eq. 1-2, fine-tuned from
the tokenizer), then the identity paths on the base (Eq. 3-7); then pictures and tables of held-out identities, scored
by the shipped judge.

  python quickstart.py                           # from the shipped foundation; a re-run after a kill continues
  python quickstart.py --foundation=scratch      # every part from nothing (data, judge, tokenizer, transformer)
  python quickstart.py --preset=foundation       # rebuild the foundation itself and write it to weights/synthfaces
  python quickstart.py --force=True              # everything again
  python quickstart.py --hear_iters=1500         # 3x the identity steps: about 4 min more

Each stage runs the command a user would type for it (printed, and logged to <out_dir>/quickstart/<stage>.log), one
line per stage with its wall time. A stage is skipped when its output exists and is complete: a training stage when
its checkpoint has reached its max_iters (a checkpoint short of that resumes with --init_from=resume, exactly).
"""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time

from checkpoint import check_manifest, export_weights, load_checkpoint
from common import UserError, cli, log, run_info
from data.curation import write_atomic

ROOT = os.path.dirname(os.path.abspath(__file__))  # the stage commands run from the repository root


@dataclasses.dataclass
class Config:
    preset: str = "synthfaces"  # synthfaces (quick start) | foundation (rebuild weights/synthfaces) | tiny (tests)
    foundation: str = "shipped"  # shipped (start from weights_dir) | scratch (train every part here first)
    weights_dir: str = "weights/synthfaces"  # the foundation read (shipped) or written (preset foundation)
    data_dir: str = "data/synthfaces/out"  # the synthfaces data (and, with --foundation=scratch, its judge)
    out_dir: str = "out"  # every stage's run folder, and quickstart/ (logs, pictures, tables)
    force: bool = False  # rerun every stage (deletes the previous outputs of the stages first)
    hear_iters: int = 0  # HEAR fine-tune steps (0: the preset's 500: the whole run about 8 min on a slow 2-core CPU)
    device: str = "auto"  # auto | cpu | cuda (passed to every stage)


PRESETS = {"synthfaces": {}, "foundation": {"foundation": "scratch", "out_dir": "out/foundation"},
           "tiny": {"foundation": "scratch", "data_dir": "out/quickstart_tiny/data", "out_dir": "out/quickstart_tiny"}}
# the foundation's tokenizer runs of every weight after its decoder run, one per learning rate, and their run folders
JOINT_RATES = ("5e-4", "2.5e-4", "1.5e-4")
JOINT_DIRS = tuple(f"tokenizer_joint{k + 1}" for k in range(len(JOINT_RATES)))
# each training stage's preset and extra arguments, per quick-start preset
STAGE_ARGS = {
    "synthfaces": {"tokenizer": ["--preset=synthfaces"], "face": ["--preset=synthfaces_face"],
                   "hear": ["--preset=synthfaces_hear"], "hear_scratch": ["--preset=synthfaces"], "eval": []},
    "foundation": {"tokenizer": ["--preset=synthfaces", "--max_iters=6000", "--eval_interval=1000"],
                   # then its decoder alone on frozen codes, then every weight on at falling rates (L2 alone)
                   "decoder": ["--preset=synthfaces", "--train_params=decoder", "--max_iters=10000",
                               "--learning_rate=5e-4", "--l1_weight=0.0", "--warmup_iters=100",
                               "--eval_interval=1000", "--log_interval=100"],
                   "joint": [["--preset=synthfaces", "--max_iters=4000", f"--learning_rate={lr}", "--l1_weight=0.0",
                              "--warmup_iters=100", "--eval_interval=500", "--log_interval=100"]
                             for lr in JOINT_RATES],
                   # the shipped face_encoder.pt: 100 steps (the preset's 60 leave the quick start's HEAR more time)
                   "face": ["--preset=synthfaces_face", "--max_iters=100", "--eval_interval=100"], "text": [],
                   "base": ["--preset=synthfaces_base"],
                   "hear": ["--preset=synthfaces_hear", "--max_iters=2000"],  # the quick start's recipe, 4x longer
                   "eval": []},
    "tiny": {"tokenizer": ["--preset=tiny"], "face": ["--preset=tiny", "--face_mask=True", "--id_weight=0.1"],
             "text": ["--preset=tiny"], "base": ["--preset=tiny", "--use_global_face=False", "--use_hf_adapter=False",
                                                  "--train_text=False"], "hear": ["--preset=tiny"],
             "eval": ["--image_size=16", "--max_images=16", "--prompts_per_identity=1", "--gallery_ids=2"]},
}
# each training stage's run folder under out_dir, in pipeline order (--force=True deletes them)
RUN_DIRS = ("tokenizer", "tokenizer_decoder", *JOINT_DIRS, "face_encoder", "text_encoder", "base", "hear")
# the slice of held-out data on which the shipped files' figures are recorded and re-checked (the first 5 held-out
# identities of the full data set, 3 images each: identities are drawn from (seed, split, ordinal) alone)
CHECK_SLICE = ["--preset=synthfaces", "--train_ids=1", "--test_ids=5", "--test_images=3", "--sheet_copy=",
               "--workers=1"]
CHECK_EVAL = ["--prompts_per_identity=2"]
# the shipped files: name -> (stage output, entries kept, what it is)
SHIPPED = {"tokenizer.pt": (f"{JOINT_DIRS[-1]}/ckpt.pt",
                            ("model", "tokenizer_config", "config", "step", "metrics"),
                            "BSQ-VAE tokenizer (the Infinity VAE of synthfaces)"),
           "judge.pt": (None, ("model", "judge_config", "config", "metrics"), "the judge: detector, identity, "
                        "attribute and trait nets that score every run"),
           "base.pt": ("base/ckpt.pt", ("model", "text_encoder", "caption_tokenizer", "model_config", "config", "step"),
                       "text-to-image base transformer without identity paths (the Infinity-2B of synthfaces)"),
           "face_encoder.pt": ("face_encoder/ckpt.pt", ("model", "tokenizer_config", "config", "step", "metrics"),
                               "the face encoder of hear.pt (Eq. 1-2, fine-tuned from tokenizer.pt)"),
           "hear.pt": ("hear/ckpt.pt", ("model", "text_encoder", "caption_tokenizer", "model_config", "config", "step"),
                       "HEAR fine-tuned on base.pt: python sample.py --face=... --prompt=... uses it")}


def judge_and_tokenizer(cfg):
    """(judge.pt, tokenizer checkpoint) a run uses: trained here (--foundation=scratch) or shipped."""
    if cfg.foundation == "scratch":  # the last tokenizer run of the chain
        last = JOINT_DIRS[-1] if "joint" in STAGE_ARGS[cfg.preset] else "tokenizer"
        return f"{cfg.data_dir}/judge.pt", f"{cfg.out_dir}/{last}/ckpt.pt"
    return f"{cfg.weights_dir}/judge.pt", f"{cfg.weights_dir}/tokenizer.pt"


def stages(cfg):
    """[(name, command, output that marks it done)] in pipeline order."""
    py, d, o, w, args = sys.executable, cfg.data_dir, cfg.out_dir, cfg.weights_dir, STAGE_ARGS[cfg.preset]
    tok, dec, face, text, base, hear = (os.path.join(o, n) for n in ("tokenizer", "tokenizer_decoder", "face_encoder",
                                                                      "text_encoder", "base", "hear"))
    dev, scratch, with_base = f"--device={cfg.device}", cfg.foundation == "scratch", "base" in args
    judge, tok_ckpt = judge_and_tokenizer(cfg)
    init = f"{base}/ckpt.pt" if with_base else f"{w}/base.pt"
    prep = "tiny" if cfg.preset == "tiny" else "synthfaces"
    out = [("data", [py, "-m", "data.synthfaces.prepare", f"--preset={prep}", f"--out_dir={d}", "--sheet_copy="],
            os.path.join(d, "meta.json"))]
    if scratch:
        out += [("judge", [py, "-m", "data.synthfaces.judge", f"--preset={prep}", f"--data_dir={d}"], judge),
                ("tokenizer", [py, "train_tokenizer.py", *args["tokenizer"], f"--data_dir={d}", f"--out_dir={tok}",
                               dev], f"{tok}/ckpt.pt")]
    if "joint" in args:  # the decoder sharpened on frozen codes, then every weight on: the codes all below read
        out.append(("tokenizer decoder", [py, "train_tokenizer.py", *args["decoder"], f"--data_dir={d}",
                                          f"--out_dir={dec}", f"--init_from={tok}/ckpt.pt", dev], f"{dec}/ckpt.pt"))
        before = dec
        for k, (joint, name) in enumerate(zip(args["joint"], JOINT_DIRS)):
            this = os.path.join(o, name)
            out.append((f"tokenizer joint {k + 1}", [py, "train_tokenizer.py", *joint, f"--data_dir={d}",
                                                     f"--out_dir={this}", f"--init_from={before}/ckpt.pt", dev],
                        f"{this}/ckpt.pt"))
            before = this
    out.append(("face encoder", [py, "train_tokenizer.py", *args["face"], f"--data_dir={d}", f"--out_dir={face}",
                                 f"--init_from={tok_ckpt}", f"--id_net=judge:{judge}", dev], f"{face}/ckpt.pt"))
    if with_base:  # the text encoder, pretrained on captions, then the text-to-image base on it (no identity paths;
        # its face encoder is never read: the tokenizer stands in)
        out.append(("text encoder", [py, "train_text_encoder.py", *args["text"], f"--data_dir={d}",
                                     f"--out_dir={text}", dev], f"{text}/ckpt.pt"))
        out.append(("base model", [py, "train.py", *args["base"], f"--data_dir={d}", f"--out_dir={base}",
                                   f"--tokenizer_ckpt={tok_ckpt}", f"--face_encoder_ckpt={tok_ckpt}",
                                   f"--text_init={text}/ckpt.pt", dev], init))
    hear_args = args["hear_scratch"] if scratch and not with_base else [*args["hear"], f"--init_from={init}"]
    hear_args = hear_args + ([f"--max_iters={cfg.hear_iters}"] if cfg.hear_iters else [])
    out.append(("transformer", [py, "train.py", *hear_args, f"--data_dir={d}", f"--out_dir={hear}",
                                f"--tokenizer_ckpt={tok_ckpt}", f"--face_encoder_ckpt={face}/ckpt.pt",
                                f"--global_face=judge:{judge}", dev],
                f"{hear}/ckpt.pt"))
    return out


def eval_stages(cfg):
    """The pictures and tables [(name, command, output)]: of the shipped files themselves when the foundation is
    rebuilt (they are written between the training and these stages), else of this run's outputs."""
    py, d, o, w, args = sys.executable, cfg.data_dir, cfg.out_dir, cfg.weights_dir, STAGE_ARGS[cfg.preset]
    qs, dev, with_base = os.path.join(o, "quickstart"), f"--device={cfg.device}", "base" in args
    if cfg.preset == "foundation":
        judge, tok, face, hear, base = (f"{w}/{n}.pt" for n in ("judge", "tokenizer", "face_encoder", "hear", "base"))
    else:
        judge, tok = judge_and_tokenizer(cfg)
        face, hear, base = (f"{o}/{n}/ckpt.pt" for n in ("face_encoder", "hear", "base"))
    ev = [f"--data_dir={d}", f"--judge={judge}", dev] + args["eval"]
    out = [("pictures", [py, "eval.py", "--what=gallery", f"--ckpt={hear}", f"--out={qs}/gallery.png", *ev],
            f"{qs}/gallery.png"),
           ("tokenizer table", [py, "eval.py", "--what=tokenizer", f"--ckpts={tok},{face}",
                                "--names=tokenizer,face encoder", f"--out={qs}/tokenizer_table.md", *ev],
            f"{qs}/tokenizer_table.md"),
           ("generation table", [py, "eval.py", "--what=generation", f"--ckpt={hear}",
                                 f"--out={qs}/generation_table.md", *ev], f"{qs}/generation_table.md")]
    if with_base:  # the base's prompt adherence: the bar a HEAR fine-tune should keep
        out.append(("base table", [py, "eval.py", "--what=generation", f"--ckpt={base}", f"--out={qs}/base_table.md",
                                   *ev], f"{qs}/base_table.md"))
    if cfg.preset == "foundation":  # the figures tests/test_foundation.py reproduces on a slice of the held-out data
        c = f"{o}/check"
        out.append(("check data", [py, "-m", "data.synthfaces.prepare", *CHECK_SLICE, f"--out_dir={c}/data"],
                    f"{c}/data/meta.json"))
        ev = [f"--data_dir={c}/data", f"--judge={judge}", dev, *CHECK_EVAL]
        which = {"tokenizer": ["--what=tokenizer", f"--ckpts={tok}", "--names=tokenizer"],
                 "base": ["--what=generation", f"--ckpt={base}"], "hear": ["--what=generation", f"--ckpt={hear}"]}
        out += [(f"check {name}", [py, "eval.py", *argv, f"--out={c}/{name}.md", *ev], f"{c}/{name}.md")
                for name, argv in which.items()]
    return out


def progress(output, max_iters=None):
    """-> "done", "partial" (a checkpoint short of its max_iters: resume it) or "missing". A checkpoint of a run with
    another length than the stage's --max_iters (max_iters) is refused: resuming it would mix two schedules."""
    if not os.path.isfile(output):
        return "missing"
    if not output.endswith("ckpt.pt"):
        return "done"
    ckpt = load_checkpoint(output)
    if max_iters is not None and ckpt["config"]["max_iters"] != max_iters:
        raise UserError(f"{output} is a {ckpt['config']['max_iters']}-step run, not {max_iters}: rerun with "
                        "--force=True (or another --out_dir)")
    return "done" if ckpt["step"] >= ckpt["config"]["max_iters"] else "partial"


def run_stage(i, n, name, command, output, log_dir):
    """Run one stage as its own process; its output goes to <log_dir>/<name>.log -> seconds it took."""
    lengths = [int(a.split("=")[1]) for a in command if a.startswith("--max_iters=")]  # the last one counts
    state = progress(output, lengths[-1] if lengths else None)
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


def check_foundation(weights_dir):
    """Every file the shipped foundation's manifest lists is present and has its recorded SHA-256 (one line if not)."""
    manifest = os.path.join(weights_dir, "manifest.json")
    if not os.path.isfile(manifest):
        raise UserError(f"{manifest} not found: the shipped foundation is missing; restore it (git checkout -- "
                        "weights/synthfaces), or train every part here with --foundation=scratch")
    with open(manifest) as f:
        for name in json.load(f)["files"]:
            path = os.path.join(weights_dir, name)
            if not os.path.isfile(path):
                raise UserError(f"{path} not found: restore it (git checkout -- weights/synthfaces)")
            check_manifest(path)  # another SHA-256: one line


def export_foundation(cfg):
    """The foundation run's outputs -> weights_dir: small weights-only files in fp16, and a manifest.json of their
    SHA-256 (the figures are added by write_manifest once the shipped files are evaluated)."""
    os.makedirs(cfg.weights_dir, exist_ok=True)
    files = {}
    for name, (output, keep, what) in SHIPPED.items():
        ckpt = load_checkpoint(os.path.join(cfg.out_dir, output) if output else os.path.join(cfg.data_dir, "judge.pt"))
        if "model_config" in ckpt:  # a transformer: its encoders are read next to it (pipeline.load_run)
            face = "face_encoder.pt" if ckpt["model_config"]["use_hf_adapter"] else "tokenizer.pt"
            ckpt["config"].update(tokenizer_ckpt="tokenizer.pt", face_encoder_ckpt=face,
                                  init_from="base.pt" if name == "hear.pt" else "scratch",
                                  global_face="judge:judge.pt" if name == "hear.pt" else "lowfreq")
        sha = export_weights(ckpt, os.path.join(cfg.weights_dir, name), keep)
        files[name] = {"sha256": sha, "bytes": os.path.getsize(os.path.join(cfg.weights_dir, name)), "what": what}
    write_atomic(os.path.join(cfg.weights_dir, "manifest.json"), json.dumps({"files": files}, indent=1) + "\n")
    log(f"foundation written to {cfg.weights_dir}: {sum(f['bytes'] for f in files.values()) / 1e6:.1f} MB in "
        f"{len(files)} files")


def write_manifest(cfg, seconds):
    """manifest.json: the files' SHA-256, the command and commit that made them, the stage times, and the shipped
    files' held-out figures (full tables, and the slice that tests/test_foundation.py re-checks)."""
    path = os.path.join(cfg.weights_dir, "manifest.json")
    with open(path) as f:
        manifest = json.load(f)

    def rows(table):
        with open(os.path.join(cfg.out_dir, table + ".json")) as f:
            return json.load(f)["rows"]

    manifest.update(command="python quickstart.py --preset=foundation", made_with=run_info("cpu"),
                    stage_seconds=seconds, scored_on="the 50 held-out identities of data/synthfaces (prepare.py's "
                    "default seed), by the shipped judge",
                    figures={t: rows(f"quickstart/{t}") for t in ("tokenizer_table", "generation_table", "base_table")},
                    checks={"data": " ".join(["python -m data.synthfaces.prepare"] + CHECK_SLICE), "eval": CHECK_EVAL,
                            "rows": {n: rows(f"check/{n}") for n in ("tokenizer", "base", "hear")}})
    write_atomic(path, json.dumps(manifest, indent=1) + "\n")


def main(cfg):
    if cfg.preset not in STAGE_ARGS:
        raise UserError(f"--preset={cfg.preset!r}: choose {', '.join(STAGE_ARGS)}")
    if cfg.foundation not in ("shipped", "scratch"):
        raise UserError(f"--foundation={cfg.foundation!r}: choose shipped or scratch")
    if cfg.hear_iters < 0:
        raise UserError(f"--hear_iters={cfg.hear_iters}: must be >= 1 (or 0 for the preset's)")
    if cfg.preset != "synthfaces" and cfg.foundation != "scratch":
        raise UserError(f"--preset={cfg.preset} trains every part itself: use it with --foundation=scratch")
    cfg = dataclasses.replace(cfg, data_dir=os.path.abspath(cfg.data_dir), out_dir=os.path.abspath(cfg.out_dir),
                              weights_dir=os.path.abspath(cfg.weights_dir))
    if cfg.foundation == "shipped":
        check_foundation(cfg.weights_dir)
    train, evals = stages(cfg), eval_stages(cfg)
    if cfg.force:
        for path in [cfg.data_dir] + [os.path.join(cfg.out_dir, n) for n in RUN_DIRS + ("quickstart", "check")]:
            shutil.rmtree(path, ignore_errors=True)
    log_dir = os.path.join(cfg.out_dir, "quickstart")
    os.makedirs(log_dir, exist_ok=True)
    n = len(train) + len(evals)
    seconds = {name: run_stage(i + 1, n, name, command, output, log_dir)
               for i, (name, command, output) in enumerate(train)}
    if cfg.preset == "foundation" and (cfg.force or any(seconds.values()) or not os.path.isfile(
            os.path.join(cfg.weights_dir, "manifest.json"))):
        export_foundation(cfg)  # the tables below score the shipped files themselves
    seconds.update({name: run_stage(len(train) + i + 1, n, name, command, output, log_dir)
                    for i, (name, command, output) in enumerate(evals)})
    total = sum(seconds.values())
    log(f"total {int(total // 60)} min {total % 60:.0f} s (stages run now; skipped ones count 0)")
    tables = ("tokenizer_table.md", "generation_table.md") + (("base_table.md",) if "base" in STAGE_ARGS[
        cfg.preset] else ())
    for name in tables:
        with open(os.path.join(log_dir, name)) as f:
            log(f"\n{f.read().strip()}")
    log(f"\npictures: {log_dir}/gallery.png (rows: held-out identities; reference, then one sample per prompt)\n"
        f"          {log_dir}/gallery_scales.png (Fig. 8: the first k scales decoded, k = 1..K)\n"
        f"stage logs: {log_dir}/*.log")
    if cfg.preset == "foundation":
        write_manifest(cfg, seconds)
    return total


if __name__ == "__main__":
    cli(main, Config, PRESETS)
