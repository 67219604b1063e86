"""
Checkpoints: atomic writes, weights-only reads and strict loads with one-line errors, foreign state dicts (the
official Infinity and VAE files), and the RNG state a resumed run restores. Every file this project writes loads with
torch.load(weights_only=True): no pickled objects, so a checkpoint can never run code when it is read.

Faults of a training run, shared by train.py and train_tokenizer.py (class Faults): a non-finite loss, SIGTERM /
SIGINT, a lost DDP rank and a torchrun restart. Each ends in a one-line message with the last checkpoint whole.
Three environment variables are test hooks only (tests/test_faults.py), read nowhere else and unset in real runs:
HEAR_TEST_HOLD_SAVE, HEAR_TEST_NAN_STEP, HEAR_TEST_KILL.
"""

import contextlib
import glob
import hashlib
import json
import math
import os
import pickle
import re
import signal
import sys
import threading
import time
import warnings

import torch

from common import UserError, log


class CheckpointMismatchError(UserError, ValueError):
    """Weights that do not fit a model (missing / unexpected / mis-shaped tensors, a foreign file); one line."""


def save_checkpoint(obj, path):
    """Atomic torch.save: write a temp file next to the target, flush it to disk, then os.replace, so a kill or a full
    disk at any moment leaves the previous checkpoint whole. A failed write removes its temp file and raises one line
    (torch reports a failed write as a RuntimeError whose context holds the OSError: ENOSPC, EFBIG, EIO)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    for stale in glob.glob(glob.escape(path) + ".tmp*"):  # the temp file of a run killed while writing
        os.remove(stale)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())  # the rename below must never point at data still only in the page cache
    except (OSError, RuntimeError) as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        cause = e if isinstance(e, OSError) else e.__context__
        if not isinstance(cause, OSError):
            raise
        raise UserError(f"cannot write the checkpoint {path} ({cause.strerror}); the previous one is unchanged: free "
                        "disk space, then continue with --init_from=resume") from None
    _test_hold(path)
    os.replace(tmp, path)


def _test_hold(path):
    """Test hook: with HEAR_TEST_HOLD_SAVE=<file>, a write that replaces an existing checkpoint creates <file> and
    sleeps before its rename, so a test can SIGKILL the process in the middle of the write."""
    flag = os.environ.get("HEAR_TEST_HOLD_SAVE")
    if flag and os.path.exists(path):
        open(flag, "w").close()
        time.sleep(3600)


def load_checkpoint(path, map_location="cpu"):
    """torch.load(weights_only=True) with a one-line error for a missing or foreign file. A file listed in a
    manifest.json beside it (the shipped weights, weights/synthfaces) must have the SHA-256 the manifest records."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist")
    check_manifest(path)
    try:
        with warnings.catch_warnings():  # torch warns (several lines) about pickle protocols it did not write
            warnings.simplefilter("ignore")
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" not in str(e):  # code needs a global (a function or class) to call
            raise UserError(f"{path} is not a loadable checkpoint (a damaged or foreign pickle); use the file "
                            "training wrote") from None
        raise UserError(f"{path} holds pickled objects other than tensors, which could run code: refused (read "
                        "with weights_only=True, nothing in it ran); use a checkpoint this project wrote") from None
    except Exception as e:  # truncated files, non-torch files
        first = str(e).splitlines()[0].split(". ")[0][:120]  # torch's first sentence
        raise UserError(f"{path} is truncated or not a loadable checkpoint ({type(e).__name__}: {first}); use an "
                        "intact copy of the file training wrote") from None


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_manifest(path):
    """If <folder of path>/manifest.json lists this file, its SHA-256 must match: a changed or damaged shipped file is
    refused with one line before anything is read from it."""
    manifest = os.path.join(os.path.dirname(os.path.abspath(path)), "manifest.json")
    if not os.path.isfile(manifest):
        return
    with open(manifest) as f:
        entry = json.load(f).get("files", {}).get(os.path.basename(path))
    if entry is not None and sha256(path) != entry["sha256"]:
        raise CheckpointMismatchError(f"{path}: its SHA-256 differs from the one {manifest} records (the file was "
                                      "changed or damaged); restore it (git checkout -- <file>) or rebuild the "
                                      "foundation (python quickstart.py --preset=foundation)")


def export_weights(ckpt, path, keep):
    """A shippable copy of a training checkpoint: only the `keep` entries (no optimizer or RNG state), the EMA weights
    as "model" when there are any, every floating-point tensor in fp16 (half the size; loading casts them back to the
    model's dtype), written atomically -> its SHA-256."""
    out = {k: ckpt[k] for k in keep if k in ckpt}
    if ckpt.get("ema"):
        out["model"] = ckpt["ema"]
    for k in ("model", "text_encoder"):
        if isinstance(out.get(k), dict):
            out[k] = {n: t.half() if t.is_floating_point() else t for n, t in out[k].items()}
    save_checkpoint(out, path)
    return sha256(path)


def read_state_dict(src, unwrap=()):
    """A state dict from a dict, a .safetensors file or a torch.load(weights_only=True) file. The first `unwrap` key
    that holds a dict is taken (official VAE files keep the weights under "vae", our training checkpoints under
    "model"). A missing, truncated or foreign file raises CheckpointMismatchError with one line."""
    if isinstance(src, (str, os.PathLike)):
        path = os.fspath(src)
        if not os.path.isfile(path):
            raise CheckpointMismatchError(f"no such file: {path}")
        try:
            if path.endswith(".safetensors"):
                from safetensors.torch import load_file  # only needed for this format

                src = load_file(path)
            else:
                src = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise CheckpointMismatchError(f"cannot read {path} ({type(e).__name__}): not a .pth / .safetensors "
                                          "state dict") from None
    if not isinstance(src, dict):
        raise CheckpointMismatchError(f"expected a state dict, got {type(src).__name__}")
    for key in unwrap:
        if isinstance(src.get(key), dict):
            return dict(src[key])
    return dict(src)


def short_list(names, n=4):
    """The first n names of a list, for a one-line error: 'a, b, c, d, ... (+3)'."""
    return ", ".join(names[:n]) + (f", ... (+{len(names) - n})" if len(names) > n else "")


def load_strict(module, state_dict, source, remedy="the file is damaged or was edited: use the one training wrote",
                optional=(), assign=False):
    """module.load_state_dict(state_dict) in which every tensor is used and every shape matches; only the names in
    `optional` may be absent (those tensors are left as they are). Anything else raises CheckpointMismatchError with
    one line instead of torch's multi-line report: '<source>: the weights do not fit the <Module> (N missing: ...;
    N unexpected: ...; N shape mismatch (checkpoint vs model): ...); <remedy>'. Keys are compared as given: renaming
    foreign (official) names is the caller's business."""
    expected, optional = module.state_dict(), set(optional)
    missing = [k for k in expected if k not in state_dict and k not in optional]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = [f"{k} {list(v.shape)} vs {list(expected[k].shape)}" for k, v in state_dict.items()
             if k in expected and v.shape != expected[k].shape]
    if missing or unexpected or wrong:
        parts = [f"{len(names)} {what}: {short_list(names)}" for what, names in
                 (("missing", missing), ("unexpected", unexpected), ("shape mismatch (checkpoint vs model)", wrong))
                 if names]
        raise CheckpointMismatchError(f"{source}: the weights do not fit the {type(module).__name__} "
                                      f"({'; '.join(parts)}); {remedy}")
    module.load_state_dict(state_dict, strict=not optional, assign=assign)


def rng_state():
    """All RNG states a resumed run needs (CPU and, when present, CUDA)."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# -----------------------------------------------------------------------------
# Faults of a training run


def init_after_restart(init_from, out_dir):
    """A worker group restarted by torchrun --max-restarts (TORCHELASTIC_RESTART_COUNT > 0) resumes from
    out_dir/ckpt.pt when one was written, whatever init_from says: the command line is the same on every attempt."""
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    return "resume" if restarted and os.path.isfile(os.path.join(out_dir, "ckpt.pt")) else init_from


def poison(loss, step):
    """Test hook: HEAR_TEST_NAN_STEP=<n> makes the loss of step n (as logged, 1-based) a real NaN, before backward."""
    return loss * float("nan") if os.environ.get("HEAR_TEST_NAN_STEP") == str(step) else loss


class Faults:
    """What a training loop checks once per step, agreed on by every rank with one all-reduce so that all of them
    skip, stop or save at the same step: a non-finite loss (nan_policy "stop": a one-line error before the update,
    the last checkpoint kept; "skip": the update is dropped and counted) and SIGTERM / SIGINT (the loop saves, then
    exits with status 128 + the signal number, as a process killed by it would, so a `&&` chain stops). A collective
    that fails because a rank died (or timed out, Config.dist_timeout_s) becomes a one-line error. As a context
    manager it installs the signal handlers and restores the previous ones on exit."""

    def __init__(self, nan_policy, dist, out_dir):
        if nan_policy not in ("stop", "skip"):
            raise UserError(f"--nan_policy={nan_policy!r}: expected stop or skip")
        self.policy, self.dist, self.out_dir = nan_policy, dist, out_dir
        self.skipped = 0  # steps whose update was dropped (saved in the checkpoint as skipped_steps)
        self.signum = 0  # the signal all ranks agreed to stop on
        self._pending, self._previous = 0, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signal handlers can only be set there
            for s in (signal.SIGTERM, signal.SIGINT):
                self._previous[s] = signal.signal(s, self._on_signal)
        return self

    def _on_signal(self, signum, frame):
        self._pending = signum
        signal.signal(signum, self._previous[signum])  # a second Ctrl-C acts at once, as it would without us

    def __exit__(self, kind, exc, tb):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}
        # gloo reports a lost peer or a timeout as a RuntimeError "[.../gloo/...cc:561] Connection closed by peer ..."
        lost = isinstance(exc, torch.distributed.DistError) or (isinstance(exc, RuntimeError) and "gloo" in str(exc))
        if self.dist.world_size > 1 and lost:
            reason = re.sub(r"^\[[^\]]*\] *", "", str(exc).strip()).split(". ")[0][:160]
            raise UserError(f"rank {self.dist.rank} lost contact with the other processes ({reason}); one of them "
                            "probably died (see its error): rerun with --init_from=resume, as torchrun "
                            "--max-restarts=N does by itself") from None

    def skip(self, loss, step):
        """-> True when step `step` (1-based, as logged) must drop its update; raises UserError with nan_policy=stop.
        Also agrees on a pending signal (self.signum), so call it once per step on every rank."""
        _test_kill(self.dist.rank, step)
        flags = torch.tensor([0.0 if math.isfinite(loss) else 1.0, float(self._pending)], device=self.dist.device)
        if self.dist.world_size > 1:
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        self.signum = int(flags[1].item())
        if flags[0].item() == 0:
            return False
        if self.policy == "stop":
            raise UserError(f"step {step}: the loss is {loss} (not finite); stopped before the update, the last "
                            f"checkpoint in {self.out_dir} is kept: lower --learning_rate, or --nan_policy=skip")
        self.skipped += 1
        log(f"step {step}: the loss is {loss} (not finite); update skipped ({self.skipped} skipped so far)",
            self.out_dir, self.dist.master)
        return True

    def exit_if_signalled(self, step):
        """After the step's checkpoint: exit with 128 + signal number when a SIGTERM / SIGINT arrived."""
        if self.signum:
            log(f"stopped by {signal.Signals(self.signum).name} after step {step}; checkpoint saved in {self.out_dir}, "
                "continue with --init_from=resume", self.out_dir, self.dist.master)
            sys.exit(128 + self.signum)


def _test_kill(rank, step):
    """Test hook: HEAR_TEST_KILL=<rank>:<step> SIGKILLs that rank as the step ends (on torchrun's first attempt)."""
    if (os.environ.get("HEAR_TEST_KILL") == f"{rank}:{step}"
            and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"):
        os.kill(os.getpid(), signal.SIGKILL)
