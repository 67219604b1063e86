"""train.py with a probe on stochastic depth, for torchrun (tests/test_train.py, run with PYTHONPATH=<repo root>): each
drop-path draw appends [attempt, rank, step, digest of the CPU RNG state it draws from] to $HEAR_PROBE/rank<r>.jsonl.
The draws themselves are left unchanged."""

import hashlib
import json
import os

import torch

import model
import train
from common import cli

_drop, _train_step = model.Block._drop, train.train_step
current = {"step": 0}  # the step being run (1-based, as logged), set before its forward


def train_step(state, cfg, batch, template):
    current["step"] = state.step + 1
    return _train_step(state, cfg, batch, template)


def drop(self, y):
    if self.training and self.drop_path > 0:
        digest = hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest()[:16]
        attempt, rank = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")), int(os.environ["RANK"])
        with open(os.path.join(os.environ["HEAR_PROBE"], f"rank{rank}.jsonl"), "a") as f:  # closed: SIGKILL-safe
            f.write(json.dumps([attempt, rank, current["step"], digest]) + "\n")
    return _drop(self, y)


if __name__ == "__main__":
    model.Block._drop, train.train_step = drop, train_step  # train_loop looks train_step up at each call
    cli(train.main, train.Config, train.PRESETS)
