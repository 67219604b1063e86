"""Bad input seen from the command line: a non-zero exit, one `error: ...` line on stderr and no traceback (real
subprocesses, grouped: each costs the imports); a pickle that would run code is refused and nothing in it runs;
curate.py skips and counts bad images instead of stopping."""

import os
import subprocess
import sys

import numpy as np
import torch
from PIL import Image

import curate
from common import parse_config
from data import curation as cu
from test_bad_input import bomb_png, tiny  # noqa: F401 (tiny: the module fixture, a tiny trained checkpoint)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class RunsCode:
    """Pickles as a call to open(marker, "w"): unpickling it creates the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def cli(script, *args):
    """Start a script in a subprocess (they run side by side: both cores) -> the process. args may be bytes."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, script, *args], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


def finish(p):
    """-> (exit code, stderr lines) of a process from cli()."""
    err = p.communicate(timeout=300)[1]
    return p.returncode, err.decode("utf-8", "replace").splitlines()


def test_command_line_errors_are_one_line(tiny, tmp_path):  # noqa: F811
    ckpt, _, face = tiny
    marker = tmp_path / "ran.txt"
    torch.save({"model": RunsCode(str(marker)), "step": 0}, tmp_path / "evil.pt")
    (tmp_path / "p.txt").write_bytes(b"a face on red\n\xff\xfe\n")
    out = tmp_path / "s.png"
    common = [f"--out={out}", "--device=cpu", "--num_samples=1"]
    runs = {
        "argv": cli("sample.py", f"--ckpt={ckpt}", f"--face={face}", b"--prompt=un caf\xe9", *common),
        "pickle": cli("sample.py", f"--ckpt={tmp_path}/evil.pt", f"--face={face}", "--prompt=a face", *common),
        "bomb": cli("sample.py", f"--ckpt={ckpt}", f"--face={bomb_png(tmp_path / 'b.png')}", "--prompt=a", *common),
        "prompts": cli("eval.py", "--what=photos", f"--ckpt={ckpt}", f"--prompts={tmp_path}/p.txt", "--device=cpu")}
    want = {"argv": "error: argument b'--prompt=un caf\\xe9' is not valid UTF-8; pass UTF-8 text",
            "pickle": f"error: {tmp_path}/evil.pt holds pickled objects other than tensors, which could run code: "
                      "refused (read with weights_only=True, nothing in it ran)",
            "bomb": f"error: {tmp_path}/b.png: Image size (900000000 pixels) exceeds limit of 178956970 pixels",
            "prompts": f"error: --prompts={tmp_path}/p.txt line 2: byte 0xff is not UTF-8"}
    for name, (code, lines) in {name: finish(p) for name, p in runs.items()}.items():
        assert code == 1 and len(lines) == 1 and lines[0].startswith(want[name]), (name, code, lines)
    assert not marker.exists() and not out.exists()  # nothing ran, nothing written
    torch.load(tmp_path / "evil.pt", weights_only=False)  # the control: an unrestricted load runs the code
    assert marker.exists()


def test_curate_skips_and_counts_bad_images(tmp_path):
    rng = np.random.default_rng(0)
    raw = tmp_path / "raw"
    raw.mkdir()
    for n in range(2):
        Image.fromarray((rng.random((160, 160, 3)) * 255).astype(np.uint8)).save(raw / f"good{n}.png")
    Image.fromarray((rng.random((160, 160)) * 65535).astype(np.uint16)).save(raw / "deep.png")  # 16-bit grey
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 160 wide, 200 tall; shown 200 wide, 160 tall
    Image.fromarray((rng.random((200, 160, 3)) * 255).astype(np.uint8)).save(raw / "phone.jpg", exif=exif)
    Image.fromarray((rng.random((300, 300, 3)) * 255).astype(np.uint8)).save(raw / "cut.jpg")
    (raw / "cut.jpg").write_bytes((raw / "cut.jpg").read_bytes()[:5000])
    (raw / "notes.png").write_text("not an image")
    Image.new("RGB", (1, 1)).save(raw / "dot.png")
    bomb_png(raw / "bomb.png")
    cfg = parse_config(curate.Config, curate.PRESETS, [f"--inputs={raw}", f"--out_dir={tmp_path}/out", "--stage=scan",
                                                       "--device=cpu", "--workers=2"])
    curate.main(cfg)
    scan = {k.split("/")[1]: r for k, r in cu.read_records(cfg.out_dir, "scan").items()}
    assert {k: r.get("drop") for k, r in scan.items() if "drop" in r} == {
        "cut.jpg": "truncated or corrupt", "notes.png": "not an image", "dot.png": "too small",
        "bomb.png": "decompression bomb"}
    assert (scan["phone.jpg"]["width"], scan["phone.jpg"]["height"]) == (200, 160)  # upright, as boxes will be
    (raw / "good1.png").write_bytes(b"overwritten")  # damaged between two stages: counted as a drop, the stage goes on
    curate.main(parse_config(curate.Config, curate.PRESETS, [f"--inputs={raw}", f"--out_dir={cfg.out_dir}",
                                                              "--stage=dedup", "--device=cpu", "--workers=2"]))
    dedup = {k.split("/")[1]: r for k, r in cu.read_records(cfg.out_dir, "dedup").items()}
    assert dedup["good1.png"]["drop"] == "unreadable" and all("phash" in dedup[k] for k in ("good0.png", "deep.png"))
