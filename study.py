"""
The paper's evidence at synthfaces scale in one command: Table 3 (the identity paths, trained over seeds, with the
full model's paired differences to each ablation), Fig. 8 as numbers (FaceSim and fine-trait accuracy of the first k
scales decoded), the identity-strength curves and Table 4 (the face encoder's losses, its face tokens downstream).
Every HEAR variant is a fine-tune of the shipped base; the scores come from the shipped judge, whose trait readers
split identity into coarse traits (skin, hair, eyes, nose, ears, facial hair) and fine ones (iris, freckles).
It reuses the quick start's data and face encoder (python quickstart.py first); a rerun skips finished outputs and
resumes a partial training run. The parts, outputs and the figures of a full run: docs/study.md.

  python study.py                                    # every part, under out/study
  python study.py --parts=table3,per_scale --seeds=3 # parts: table3, per_scale, strength, table4
  python study.py --hear_iters=1000 --jobs=2         # longer fine-tunes, 2 trainings at a time on half the cores each
  python study.py --preset=tiny                      # toy sizes (after python quickstart.py --preset=tiny)

Every command is one a user would type (its log: <out_dir>/logs/). study.json records each with its wall and CPU
time (of the child process), the commit, the machine and the total CPU time.
"""

import collections
import dataclasses
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from checkpoint import load_checkpoint
from common import UserError, cli, config_dict, log, run_info
from metrics import line_plot

ROOT = os.path.dirname(os.path.abspath(__file__))  # the commands run from the repository root
LOCK = threading.Lock()  # guards the study record when --jobs > 1 trainings finish in parallel threads


@dataclasses.dataclass
class Config:
    preset: str = "synthfaces"  # synthfaces (the quick start's sizes) | tiny (toy sizes, a smoke test)
    parts: str = "table3,per_scale,strength,table4"  # comma-separated parts to run
    seeds: int = 3  # training seeds of every trained variant
    data_dir: str = "data/synthfaces/out"  # the quick start's synthfaces data
    judge: str = "weights/synthfaces/judge.pt"  # the judge that scores every run (the shipped one)
    base_ckpt: str = "weights/synthfaces/base.pt"  # the text-to-image base every HEAR variant is fine-tuned on
    tokenizer_ckpt: str = "weights/synthfaces/tokenizer.pt"  # the generation tokenizer
    face_encoder_ckpt: str = "out/face_encoder/ckpt.pt"  # the quick start's face encoder
    out_dir: str = "out/study"  # runs, tables, plots, logs and study.json
    device: str = "auto"  # auto | cpu | cuda (passed to every command)
    jobs: int = 1  # trainings run at once, each with cores // jobs threads (the evaluations run after, one at a time)
    hear_iters: int = 0  # steps of every HEAR fine-tune (0: the quick start's, train.py's synthfaces_hear preset)


PRESETS = {"synthfaces": {}, "tiny": {"seeds": 2, "data_dir": "out/quickstart_tiny/data", "out_dir": "out/study_tiny",
                                      "tokenizer_ckpt": "out/quickstart_tiny/tokenizer/ckpt.pt",
                                      "judge": "out/quickstart_tiny/data/judge.pt",
                                      "base_ckpt": "out/quickstart_tiny/base/ckpt.pt",
                                      "face_encoder_ckpt": "out/quickstart_tiny/face_encoder/ckpt.pt"}}
SIZES = {  # per study preset: the train.py preset, the face encoder's flags and the eval.py flags of the quick start
    "synthfaces": dict(train="synthfaces_hear", face=["--preset=synthfaces_face"], eval=[], hf_from=3),
    "tiny": dict(train="tiny", face=["--preset=tiny", "--face_mask=True", "--id_weight=0.1"],
                 eval=["--image_size=16", "--max_images=16", "--prompts_per_identity=1"], hf_from=1),
}  # hf_from: the scale the adapter starts at in the per_scale curve "adapter from scale k" (synthfaces: the 2 finest)
PARTS = ("table3", "per_scale", "strength", "table4")
# Table 3 rows: the text-only baseline, then the paper's order -> (row label, use_global_face, use_hf_adapter)
VARIANTS = {"text_only": ("text only (no face)", False, False),
            "no_hf": ("w/o high-frequency adapter (global face tokens only)", True, False),
            "no_global": ("w/o global face tokens (high-frequency adapter only)", False, True),
            "full": ("HEAR (both identity paths)", True, True)}
# Table 4 rows: (label, folder under table4/, flags on top of the face preset) or (label, a quick-start Config field)
TOKENIZERS = [("generation tokenizer (no fine-tune)", "tokenizer_ckpt"),
              ("plain fine-tune (same budget)", "tok_plain", ["--face_mask=False", "--id_weight=0"]),
              ("HEAR face encoder (Eq. 1-2)", "face_encoder_ckpt"), ("w/o VQ loss", "tok_no_vq", ["--vq_weight=0"]),
              ("w/o identity loss", "tok_no_id", ["--id_weight=0"]),
              ("w/o face mask (alpha=1)", "tok_no_mask", ["--face_alpha=1"])]
# Table 4 downstream rows: (label, variant, face tokens of: the face encoder | the generation tokenizer)
TABLE4_RUNS = [("HEAR, face tokens of the generation tokenizer", "full", "tokenizer"),
               ("HEAR, face tokens of the face encoder", "full", "face_encoder")]
# per_scale curves: name -> (variant, eval.py flags ("{hf_from}": SIZES' hf_from), legend, colour)
PER_SCALE = {"full": ("full", [], "HEAR", "green"), "no_hf": ("no_hf", [], "w/o adapter", "orange"),
             "full_hf_late": ("full", ["--hf_from_scale={hf_from}"], "HEAR, adapter from scale {hf_from}", "purple"),
             "full_id_scale_0": ("full", ["--id_scale=0"], "HEAR, id_scale 0", "blue")}
# table columns; the trait columns appear when the judge has trait readers and the data its traits.json
METRICS = (("face_sim", "FaceSim"), ("top1", "identity top-1"), ("coarse_trait", "coarse traits"),
           ("fine_trait", "fine traits"), ("prompt_acc", "prompt adherence"))
Step = collections.namedtuple("Step", "part name argv output")  # output: the file that marks the command done


def run_dir(cfg, variant, seed, faces="face_encoder"):
    """A trained run's folder (face tokens of the face encoder: table3/, of another tokenizer: table4/)."""
    return f"{cfg.out_dir}/" + (f"table3/{variant}_s{seed}" if faces == "face_encoder" else
                                f"table4/{variant}_{faces}_faces_s{seed}")


def commands(cfg):
    """Every command of the selected parts, in order, each output once -> [Step]."""
    if any(p not in PARTS for p in cfg.parts.split(",")) or cfg.preset not in SIZES or cfg.seeds < 1:
        raise UserError(f"--parts={cfg.parts!r} --preset={cfg.preset!r} --seeds={cfg.seeds}: parts from "
                        f"{','.join(PARTS)}, preset {' or '.join(SIZES)}, seeds >= 1")
    if cfg.jobs < 1 or cfg.hear_iters < 0:
        raise UserError(f"--jobs={cfg.jobs} --hear_iters={cfg.hear_iters}: give the number of trainings to run at once "
                        "(>= 1) and the fine-tune steps (0 = the quick start's)")
    size, d, out = SIZES[cfg.preset], cfg.data_dir, cfg.out_dir

    def script(name, *args):
        return [sys.executable, name, *args, f"--device={cfg.device}"]

    def evaluate(part, name, what, table, *flags):  # table: the .md path without .md; its numbers: <table>.json
        return Step(part, name, script("eval.py", f"--what={what}", f"--out={table}.md", f"--data_dir={d}",
                                       f"--judge={cfg.judge}", *size["eval"], *flags), table + ".json")

    def train(part, variant, seed, faces="face_encoder"):  # one variant, with the quick start's train.py recipe
        run, (_, use_global, use_hf) = run_dir(cfg, variant, seed, faces), VARIANTS[variant]
        face_ckpt = cfg.face_encoder_ckpt if faces == "face_encoder" else cfg.tokenizer_ckpt
        argv = script("train.py", f"--preset={size['train']}", f"--init_from={cfg.base_ckpt}", f"--data_dir={d}",
                      f"--out_dir={run}", f"--seed={seed}", f"--tokenizer_ckpt={cfg.tokenizer_ckpt}",
                      f"--face_encoder_ckpt={face_ckpt}", f"--global_face=judge:{cfg.judge}",
                      f"--use_global_face={use_global}", f"--use_hf_adapter={use_hf}",
                      *([f"--max_iters={cfg.hear_iters}"] if cfg.hear_iters else []))
        return Step(part, f"train {os.path.basename(run)}", argv, f"{run}/ckpt.pt")

    def hear(part, variant, seed, faces="face_encoder"):  # train it, then score it with eval.py --what=generation
        run = run_dir(cfg, variant, seed, faces)
        return [train(part, variant, seed, faces), evaluate(part, f"eval {os.path.basename(run)}", "generation",
                                                            f"{run}/generation", f"--ckpt={run}/ckpt.pt")]

    def tokenizer(folder, flags):  # a face-encoder variant: the quick start's face-encoder recipe + its switches
        run = f"{out}/table4/{folder}"
        argv = script("train_tokenizer.py", *size["face"], f"--data_dir={d}", f"--out_dir={run}",
                      f"--init_from={cfg.tokenizer_ckpt}", f"--id_net=judge:{cfg.judge}", *flags)
        return Step("table4", f"tokenizer {folder}", argv, f"{run}/ckpt.pt")

    steps = {"table3": [s for v in VARIANTS for seed in range(cfg.seeds) for s in hear("table3", v, seed)]}
    steps["per_scale"] = [train("per_scale", "full", 0), train("per_scale", "no_hf", 0)]
    steps["per_scale"] += [evaluate("per_scale", f"per_scale {n}", "per_scale", f"{out}/per_scale/{n}",
                                    f"--ckpt={run_dir(cfg, v, 0)}/ckpt.pt",
                                    *(f.format(hf_from=size["hf_from"]) for f in flags))
                           for n, (v, flags, _, _) in PER_SCALE.items()]
    steps["strength"] = [train("strength", "full", 0), evaluate("strength", "strength", "strength",
                                                                f"{out}/strength/strength",
                                                                f"--ckpt={run_dir(cfg, 'full', 0)}/ckpt.pt")]
    variants = [tokenizer(folder, flags[0]) for _, folder, *flags in TOKENIZERS if flags]
    ckpts = [f"{out}/table4/{folder}/ckpt.pt" if flags else getattr(cfg, folder) for _, folder, *flags in TOKENIZERS]
    steps["table4"] = variants + [evaluate("table4", "tokenizer table", "tokenizer", f"{out}/table4/tokenizers",
                                           f"--ckpts={','.join(ckpts)}",
                                           f"--names={','.join(t[0] for t in TOKENIZERS)}")]
    for seed in range(cfg.seeds):
        steps["table4"] += [s for _, variant, faces in TABLE4_RUNS for s in hear("table4", variant, seed, faces)]
    chosen, seen = [], set()
    for step in (s for p in cfg.parts.split(",") for s in steps[p]):
        if step.output not in seen:
            chosen.append(step)
            seen.add(step.output)
    return chosen


def spawn(argv, log_file, threads):
    """Run argv with its output in log_file (threads: OMP_NUM_THREADS, 0 = inherited) -> (exit code, its CPU
    seconds). os.wait4 gives this child's own usage, so parallel commands do not add to each other's time."""
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    child = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    _, status, usage = os.wait4(child.pid, 0)
    return os.waitstatus_to_exitcode(status), usage.ru_utime + usage.ru_stime


def run_step(step, record, log_dir, threads=0):
    """Run one command unless its output is complete (a checkpoint short of its max_iters resumes); add its times to
    record (under LOCK: trainings may run in parallel threads)."""
    ckpt = load_checkpoint(step.output) if step.output.endswith("ckpt.pt") and os.path.isfile(step.output) else None
    partial = ckpt is not None and ckpt["step"] < ckpt["config"]["max_iters"]
    if os.path.isfile(step.output) and not partial:
        return log(f"  done already: {step.output}")
    argv = step.argv + (["--init_from=resume"] if partial else [])
    path = os.path.join(log_dir, step.name.replace(" ", "_") + ".log")
    log(f"  started: {step.name}")
    t0 = time.time()
    with open(path, "w") as f:
        f.write(shlex.join(argv) + "\n")
        f.flush()
        code, cpu = spawn(argv, f, threads)
    wall = time.time() - t0
    if code != 0:
        print("\n".join(open(path).read().splitlines()[-15:]))
        raise UserError(f"'{step.name}' failed (exit {code}); its log: {path}; fix and rerun python study.py")
    with LOCK:
        entry = record["commands"].setdefault(step.output, {"part": step.part, "wall_s": 0.0, "cpu_s": 0.0})
        entry.update(command=shlex.join(["python"] + argv[1:]), wall_s=entry["wall_s"] + wall,
                     cpu_s=entry["cpu_s"] + cpu)
    log(f"  {step.name}: {wall / 60:.1f} min wall, {cpu / 60:.1f} min CPU: {entry['command']}")


def machine():
    """CPU model (/proc/cpuinfo), cores, threads, torch and Python versions."""
    cpu = platform.processor()
    if os.path.isfile("/proc/cpuinfo"):
        cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), cpu)
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version()}


def seed_table(groups):
    """{row label: [per-seed {metric: value}]} -> (markdown rows: mean ± sample std (n - 1; no spread, and std None,
    for one seed) and the number of seeds, {label: {metric: {mean, std, values}}}). Labels without runs are left out;
    the columns are the METRICS every run has."""
    groups = {label: runs for label, runs in groups.items() if runs}
    metrics = [(k, name) for k, name in METRICS if all(k in r for runs in groups.values() for r in runs)]
    rows = ["| model | " + " | ".join(n for _, n in metrics) + " | seeds |", "|---" * (len(metrics) + 2) + "|"]
    numbers = {}
    for label, runs in groups.items():
        values = {key: [r[key] for r in runs] for key, _ in metrics}
        numbers[label] = {k: {"mean": statistics.mean(v), "std": statistics.stdev(v) if len(v) > 1 else None,
                              "values": v} for k, v in values.items()}
        cells = [f"{numbers[label][k]['mean']:.4f}" + (f" ± {numbers[label][k]['std']:.4f}" if len(runs) > 1 else "")
                 for k, _ in metrics]
        rows.append(f"| {label} | {' | '.join(cells)} | {len(runs)} |")
    return rows, numbers


def paired_differences(numbers, reference):
    """The reference row minus every other row, seed by seed (runs with the same seed share the data order and the
    sampling seed, so they pair) -> (markdown rows: mean difference ± its standard error, sample std / sqrt(n);
    {label: {metric: {mean, se, n}}}). Only rows with the reference's number of seeds pair."""
    ref = numbers[reference]
    metrics = [(k, name) for k, name in METRICS if k in ref]
    rows = [f"| {reference} minus | " + " | ".join(n for _, n in metrics) + " | seeds |",
            "|---" * (len(metrics) + 2) + "|"]
    diffs = {}
    for label, row in numbers.items():
        n = len(ref[metrics[0][0]]["values"])
        if label == reference or len(row[metrics[0][0]]["values"]) != n:
            continue
        d = {k: [a - b for a, b in zip(ref[k]["values"], row[k]["values"])] for k, _ in metrics}
        diffs[label] = {k: {"mean": statistics.mean(v), "se": statistics.stdev(v) / n ** 0.5 if n > 1 else None,
                            "n": n} for k, v in d.items()}
        cells = [f"{diffs[label][k]['mean']:+.4f}" + (f" ± {diffs[label][k]['se']:.4f}" if n > 1 else "")
                 for k, _ in metrics]
        rows.append(f"| {label} | {' | '.join(cells)} | {n} |")
    return rows, diffs


def write_tables(cfg, record, part, runs, head=""):
    """runs [(label, variant, faces)], the first the reference -> <part>.md (head; the seed table of each run's own row
    of its generation.json, the first: "HEAR (face + prompt)", or "base model (prompt only)" for a run without identity
    paths; the reference minus every other row, paired by seed) and
    <part>.json (the numbers and differences; the commands of the part and of its runs, with their CPU time and its
    total; commit; machine)."""
    dirs = {label: [run_dir(cfg, variant, s, faces) for s in range(cfg.seeds)] for label, variant, faces in runs}
    rows, numbers = seed_table({label: [next(iter(json.load(open(f"{d}/generation.json"))["rows"].values()))
                                        for d in ds if os.path.isfile(f"{d}/generation.json")]
                                for label, ds in dirs.items()})
    reference = runs[0][0]
    diff_rows, diffs = paired_differences(numbers, reference) if reference in numbers else ([], {})
    write(cfg, f"{part}.md", head + "\n".join(rows) + "\n\nmean ± sample std over training seeds (eval.py "
          "--what=generation on the held-out identities)\n\n" + "\n".join(diff_rows) + "\n\npaired by seed: mean "
          "difference ± its standard error; commands, CPU time, commit and machine: " + f"{part}.json")
    own = {d for ds in dirs.values() for d in ds}
    commands = {o: e for o, e in record["commands"].items() if e["part"] == part or os.path.dirname(o) in own}
    numbers = {k: record[k] for k in ("commit", "machine", "study_command")} | {
        "cpu_s": sum(e["cpu_s"] for e in commands.values()), "commands": commands, "rows": numbers,
        "differences": {"reference": reference, "rows": diffs}}
    write(cfg, f"{part}.json", json.dumps(numbers, indent=1))


def write_plots(cfg, chosen):
    """per_scale.png: FaceSim vs k of the PER_SCALE curves (their numbers: per_scale/<name>.md); strength.png: FaceSim
    (top) and prompt adherence (bottom) vs id_scale (left) and hf_from_scale (right) (numbers: strength/strength.md)."""
    if "per_scale" in chosen:
        curves = {n: json.load(open(f"{cfg.out_dir}/per_scale/{n}.json")) for n in PER_SCALE}
        ks = list(range(1, len(curves["full"]["face_sim"]) + 1))
        panels = [(f"{title} of the first k scales decoded", "k",
                   [(legend.format(hf_from=SIZES[cfg.preset]["hf_from"]), ks, curves[n][key], colour)
                    for n, (_, _, legend, colour) in PER_SCALE.items()])
                  for key, title in (("face_sim", "FaceSim"), ("fine_trait", "fine-trait accuracy"))
                  if all(key in c for c in curves.values())]
        line_plot(panels, f"{cfg.out_dir}/per_scale.png", 420 * len(panels), 300, len(panels))
    if "strength" in chosen:
        s = json.load(open(f"{cfg.out_dir}/strength/strength.json"))
        panels = [(f"{title} vs {x}", x, [("", s[x]["values"], s[x][k], colour)]) for k, title, colour in
                  (("face_sim", "FaceSim", "green"), ("prompt_acc", "prompt adherence", "blue"))
                  for x in ("id_scale", "hf_from_scale")]
        line_plot(panels, f"{cfg.out_dir}/strength.png", 640, 480, 2)


def write(cfg, name, text):
    """A text file under out_dir."""
    with open(os.path.join(cfg.out_dir, name), "w") as f:
        f.write(text + "\n")


def main(cfg):
    todo = commands(cfg)
    missing = [p for p in (cfg.judge, cfg.base_ckpt, cfg.tokenizer_ckpt, cfg.face_encoder_ckpt)
               if not os.path.isfile(p)]
    if missing:
        raise UserError(f"{', '.join(missing)} not found: run python quickstart.py --preset={cfg.preset} first")
    os.makedirs(os.path.join(cfg.out_dir, "logs"), exist_ok=True)
    path = os.path.join(cfg.out_dir, "study.json")
    record = json.load(open(path)) if os.path.isfile(path) else {"commands": {}}  # a rerun adds to the earlier times
    flags = [f"--{k}={v}" for k, v in config_dict(cfg).items() if k == "preset" or v != getattr(Config(), k)]
    record.update(commit=run_info("cpu").split(" | ")[0].removeprefix("commit "), machine=machine(),
                  study_command=shlex.join(["python", "study.py", *flags]))
    # trainings need only the quick start's outputs, so they go first, cfg.jobs at a time; evaluations read them
    trainings = [s for s in todo if s.output.endswith("ckpt.pt")]
    threads = max(1, (os.cpu_count() or 1) // cfg.jobs) if cfg.jobs > 1 else 0
    log_dir = os.path.join(cfg.out_dir, "logs")

    def run(step):
        log(f"[{todo.index(step) + 1}/{len(todo)}] {step.name}")
        run_step(step, record, log_dir, threads if step in trainings else 0)
        with LOCK:
            save_record(cfg, record)  # after every command: a killed study keeps the times of the finished ones

    with ThreadPoolExecutor(cfg.jobs) as pool:
        list(pool.map(run, trainings))  # list(): re-raises the first failure
    for step in todo:
        if step not in trainings:
            run(step)
    save_record(cfg, record)
    chosen = cfg.parts.split(",")
    if "table3" in chosen:  # the full model first: the reference of the paired differences
        write_tables(cfg, record, "table3", [(v[0], k, "face_encoder") for k, v in reversed(VARIANTS.items())])
    write_plots(cfg, chosen)
    if "table4" in chosen:
        head = open(f"{cfg.out_dir}/table4/tokenizers.md").read().strip() + "\n\n"
        write_tables(cfg, record, "table4", TABLE4_RUNS[::-1], head)
    log(f"study: {record['total_cpu_s'] / 3600:.2f} CPU hours over all its commands; outputs in {cfg.out_dir}")
    return record


def save_record(cfg, record):
    """study.json with the totals over every command run so far (by this and earlier invocations)."""
    for key in ("cpu_s", "wall_s"):
        record[f"total_{key}"] = sum(e[key] for e in record["commands"].values())
    write(cfg, "study.json", json.dumps(record, indent=1))


if __name__ == "__main__":
    cli(main, Config, PRESETS)
