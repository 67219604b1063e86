"""
Shared plumbing for every script: one config mechanism, device/DDP setup, precision, logging, the learning-rate
schedule and seeded generators (checkpoints are in checkpoint.py).

Config mechanism (used by every script, nothing else is read):
  each script defines `@dataclass class Config` (one comment per field) and `PRESETS = {"name": {...}}`;
  `python script.py --preset=synthfaces --key=value ...` applies the preset first, then the overrides.
  Values are parsed with ast.literal_eval (fall back to the raw string) and type-checked against the field.
  Unknown keys fail with the closest known key suggested. The resolved config is printed and saved next to outputs.
"""

import ast
import dataclasses
import datetime
import difflib
import json
import math
import os
import subprocess
import sys
import time
import typing
from contextlib import nullcontext

import torch


class UserError(Exception):
    """Bad input from the user (config, paths, data): reported as one line, no traceback."""


# -----------------------------------------------------------------------------
# Config: dataclass + presets + --key=value overrides


def _coerce(name, value, annotation):
    """Check/convert a parsed override against the dataclass field type; raise UserError if it does not fit."""
    origin = typing.get_origin(annotation)
    if annotation is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if isinstance(value, bool) or value in (0, 1):
            return bool(value)
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        if isinstance(value, str) and value.strip().lower().lstrip("+-") in ("nan", "inf", "infinity"):
            value = float(value)  # refused just below, with the reason
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise UserError(f"--{name}={value}: not a finite number")
            return float(value)
    elif annotation is str:
        return str(value)
    elif origin in (tuple, list) or annotation in (tuple, list):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = (value,)  # `--ch_mult=4` is a 1-tuple
        if isinstance(value, (tuple, list)):
            return tuple(value) if (origin or annotation) is tuple else list(value)
    elif origin is typing.Union:  # Optional[X]
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() == "none"):
            return None
        return _coerce(name, value, args[0])
    else:
        return value
    raise UserError(f"--{name}={value!r}: expected {getattr(annotation, '__name__', annotation)}")


def parse_config(config_cls, presets, argv=None):
    """argv like ['--preset=synthfaces', '--lr=3e-4'] -> config_cls instance (preset first, then overrides)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    hints = typing.get_type_hints(config_cls)
    overrides, preset = {}, None
    for arg in argv:
        if any("\udc80" <= c <= "\udcff" for c in arg):  # bytes that are not UTF-8 (sys.argv keeps them as surrogates)
            raise UserError(f"argument {arg.encode('utf-8', 'surrogateescape')!r} is not valid UTF-8; pass UTF-8 text "
                            "(check the terminal's encoding, e.g. LANG=C.UTF-8)")
        if not arg.startswith("--") or "=" not in arg:
            raise UserError(f"argument {arg!r} is not of the form --key=value (see the script docstring)")
        key, raw = arg[2:].split("=", 1)
        if key == "preset":
            preset = raw
            continue
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields) + ["preset"], n=1)
            hint = f"; did you mean --{close[0]}?" if close else ""
            raise UserError(f"unknown config key --{key}{hint}")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw  # plain strings need no quotes: --out_dir=out/run1
        overrides[key] = _coerce(key, value, hints[key])
    values = {}
    if preset is not None:
        if preset not in presets:
            raise UserError(f"unknown preset {preset!r}; choose one of {sorted(presets)}")
        for key, value in presets[preset].items():
            values[key] = _coerce(key, value, hints[key])  # a preset with a bad key is a bug, let it raise
        if "preset" in fields:
            values["preset"] = preset
    values.update(overrides)
    return config_cls(**values)


def config_dict(cfg):
    """Dataclass -> plain JSON-able dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def save_config(cfg, out_dir, name="config.json"):
    """Print the resolved config and write it next to the outputs."""
    os.makedirs(out_dir, exist_ok=True)
    text = json.dumps(config_dict(cfg), indent=1)
    with open(os.path.join(out_dir, name), "w") as f:
        f.write(text + "\n")
    return text


def usage(main, config_cls, presets):
    """--help: the script's docstring, then every --key=default with its comment (read from the Config source)."""
    import inspect

    lines = [sys.modules[main.__module__].__doc__ or "", f"presets: {', '.join(presets)}", "options:"]
    for line in inspect.getsource(config_cls).splitlines():
        name, _, rest = line.strip().partition(":")
        if name in {f.name for f in dataclasses.fields(config_cls)} and "=" in rest:
            lines.append(f"  --{name}={rest.split('=', 1)[1].strip()}")
    return "\n".join(lines)


def cli(main, config_cls, presets):
    """Entry point shared by every script: parse argv, run main(cfg), print bad-input errors as one line."""
    if {"-h", "--help"} & set(sys.argv[1:]):
        return print(usage(main, config_cls, presets))
    try:
        cfg = parse_config(config_cls, presets)
        main(cfg)
    except UserError as e:
        sys.exit(f"error: {e}")
    except FileNotFoundError as e:
        sys.exit(f"error: file not found: {e.filename or e}")
    except ValueError as e:
        # load errors of our library files (wrong checkpoint, bad shapes) are ValueError subclasses meant for users
        if type(e).__module__ in ("common", "tokenizer", "model", "face_encoder"):
            sys.exit(f"error: {e}")
        raise
    except KeyboardInterrupt:
        sys.exit("interrupted")


# -----------------------------------------------------------------------------
# Device, DDP, precision


@dataclasses.dataclass
class Dist:
    rank: int = 0  # global rank
    local_rank: int = 0
    world_size: int = 1
    device: str = "cpu"

    @property
    def master(self):
        return self.rank == 0


def resolve_device(device="auto"):
    """--device value -> a torch device string: auto picks CUDA when visible; cuda without a GPU is a UserError."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device=cuda but no CUDA device is visible; use --device=cpu")
    return device


def setup_device(device="auto", timeout_s=600.0):
    """DDP iff RANK is in the environment (torchrun) -> Dist(rank, local_rank, world_size, device). A collective that
    waits more than timeout_s for a rank (dead or hung) raises instead of waiting for ever."""
    device = resolve_device(device)
    if "RANK" not in os.environ:
        return Dist(device=device)
    rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    backend = "nccl" if device.startswith("cuda") else "gloo"
    timeout, store, attempt = datetime.timedelta(seconds=timeout_s), None, os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt not in (None, "0") and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # torchrun --max-restarts keeps one store for all attempts, and it still holds the killed attempt's addresses
        store = torch.distributed.PrefixStore(f"attempt{attempt}", torch.distributed.TCPStore(
            os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, False, timeout))
    torch.distributed.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    return Dist(rank, local_rank, world, device)


def autocast(device, dtype="bfloat16"):
    """bf16 autocast on CUDA, plain fp32 on CPU (CPU bf16 autocast is slow and changes numerics)."""
    if not str(device).startswith("cuda") or dtype == "float32":
        return nullcontext()
    return torch.autocast("cuda", dtype={"bfloat16": torch.bfloat16, "float16": torch.float16}[dtype])


def run_info(device):
    """git commit, torch version and device name, for the top of every log."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "unknown"
    except OSError:
        commit = "unknown"
    name = torch.cuda.get_device_name(device) if str(device).startswith("cuda") else f"cpu x{torch.get_num_threads()}"
    return f"commit {commit} | torch {torch.__version__} | device {name}"


def lr_schedule(step, peak, warmup, total, min_ratio=0.0, cosine=True):
    """Learning rate at `step` (0-based): linear warmup to `peak` over `warmup` steps, then constant (cosine=False,
    the paper's transformer recipe) or a cosine decay that reaches min_ratio * peak at step `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    if not cosine:
        return peak
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


# -----------------------------------------------------------------------------
# Logging and seeds


def log(msg, out_dir=None, master=True):
    """print on rank 0 and append to out_dir/log.txt."""
    if not master:
        return
    print(msg, flush=True)
    if out_dir:
        with open(os.path.join(out_dir, "log.txt"), "a") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}\n")


def seeded_generator(*keys, device="cpu"):
    """A torch.Generator whose stream is a function of a tuple of ints, e.g. (seed, epoch) or (seed, step, rank):
    per-step draws depend only on the step, never on how many numbers earlier steps drew, so a resumed run and any
    world size see the same numbers. hash() of a tuple of ints is the same in every Python process."""
    return torch.Generator(device=device).manual_seed(hash(keys) % 2**63)
