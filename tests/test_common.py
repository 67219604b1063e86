"""The one config mechanism and the checkpoint helpers shared by every script."""

import dataclasses
import json
import os

import pytest
import torch

from common import UserError, parse_config, save_config
from checkpoint import CheckpointMismatchError, load_checkpoint, load_strict, save_checkpoint


@dataclasses.dataclass
class Config:
    preset: str = "synthfaces"  # preset name (recorded)
    learning_rate: float = 1e-4  # AdamW lr
    max_iters: int = 10  # steps
    out_dir: str = "out"  # where to write
    compile: bool = False  # torch.compile
    ch_mult: tuple = (1, 2)  # channel multipliers


PRESETS = {"synthfaces": {"max_iters": 100}, "tiny": {"max_iters": 3, "ch_mult": (1,)}}


def test_preset_then_overrides_with_types():
    cfg = parse_config(Config, PRESETS, ["--preset=tiny", "--max_iters=7", "--learning_rate=3e-4",
                                         "--out_dir=runs/a b", "--compile=True", "--ch_mult=(1,2,4)"])
    assert cfg == Config("tiny", 3e-4, 7, "runs/a b", True, (1, 2, 4))
    assert parse_config(Config, PRESETS, ["--preset=synthfaces"]).max_iters == 100
    assert parse_config(Config, PRESETS, ["--learning_rate=1"]).learning_rate == 1.0  # int accepted for float


@pytest.mark.parametrize("argv,needle", [
    (["--learning_rat=1"], "did you mean --learning_rate"),
    (["--max_iters=1.5"], "expected int"),
    (["--compile=maybe"], "expected bool"),
    (["--preset=nope"], "unknown preset"),
    (["max_iters=3"], "--key=value"),
])
def test_bad_config_gives_one_line_error(argv, needle):
    with pytest.raises(UserError) as e:
        parse_config(Config, PRESETS, argv)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_config_saved_next_to_outputs(tmp_path):
    cfg = parse_config(Config, PRESETS, ["--preset=tiny"])
    save_config(cfg, str(tmp_path))
    assert json.load(open(tmp_path / "config.json")) == {**dataclasses.asdict(cfg), "ch_mult": [1]}


def test_checkpoint_atomic_roundtrip_and_bad_file(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    obj = {"model": {"w": torch.randn(3)}, "step": 5, "config": {"a": [1, 2]}}
    save_checkpoint(obj, path)
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt"]  # no temp file left behind
    back = load_checkpoint(path)
    assert back["step"] == 5 and torch.equal(back["model"]["w"], obj["model"]["w"])
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a loadable checkpoint"):
        load_checkpoint(str(tmp_path / "junk.pt"))
    with pytest.raises(UserError, match="does not exist"):
        load_checkpoint(str(tmp_path / "missing.pt"))


def test_load_strict_one_line_report_then_exact_load():
    """A real mismatch (missing, unexpected and wrong-shape keys) is one line with the counts and the first names, and
    loads nothing; a matching state dict loads and equals its source; `optional` names may be absent."""
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3), torch.nn.Linear(3, 2))
    source = {k: torch.randn_like(v) for k, v in module.state_dict().items()}
    bad = {k: v for k, v in source.items() if not k.startswith("1.")}  # 2 missing
    bad["0.weight"] = torch.zeros(3, 5)  # 1 of the wrong shape
    bad.update({f"extra.{i}": torch.zeros(1) for i in range(6)})  # 6 unexpected: 4 named, then a count
    with pytest.raises(CheckpointMismatchError) as err:
        load_strict(module, bad, "bad.pt", remedy="use the file training wrote")
    assert isinstance(err.value, UserError) and str(err.value) == (
        "bad.pt: the weights do not fit the Sequential (2 missing: 1.weight, 1.bias; 6 unexpected: extra.0, extra.1, "
        "extra.2, extra.3, ... (+2); 1 shape mismatch (checkpoint vs model): 0.weight [3, 5] vs [3, 4]); use the file "
        "training wrote")
    assert not any(torch.equal(v, source[k]) for k, v in module.state_dict().items())  # nothing was loaded
    load_strict(module, source, "good.pt")
    assert all(torch.equal(v, source[k]) for k, v in module.state_dict().items())
    fresh = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3), torch.nn.Linear(3, 2))
    kept = fresh[2].bias.clone()
    load_strict(fresh, {k: v for k, v in source.items() if k != "2.bias"}, "base.pt", optional=["2.bias"])
    assert torch.equal(fresh[2].bias, kept) and torch.equal(fresh[2].weight, source["2.weight"])


def test_help_lists_every_key_with_default_and_comment():
    from common import usage

    def main(cfg):
        """unused"""

    text = usage(main, Config, PRESETS)
    assert "presets: synthfaces, tiny" in text
    assert "  --learning_rate=1e-4  # AdamW lr" in text and "  --ch_mult=(1, 2)  # channel multipliers" in text
