"""
Checkpoints: atomic writes, weights-only reads with one-line errors, foreign state dicts (the official Infinity and
VAE files), and the RNG state a resumed run restores. Every file this project writes loads with
torch.load(weights_only=True): no pickled objects, so a checkpoint can never run code when it is read.
"""

import os
import pickle
import warnings

import torch

from common import UserError


class CheckpointMismatchError(UserError, ValueError):
    """Weights that do not fit a model (missing / unexpected / mis-shaped tensors, a foreign file); one line."""


def save_checkpoint(obj, path):
    """Atomic torch.save: write a temp file next to the target, then os.replace (never a half-written ckpt)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, map_location="cpu"):
    """torch.load(weights_only=True) with a one-line error for a missing or foreign file."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist")
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
