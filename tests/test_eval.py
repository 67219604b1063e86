"""eval.py: Table 2 metric definitions and the tokenizer comparison table."""

import math

import torch

import eval as ev
import metrics
from common import parse_config
from conftest import write_tokenizer_ckpt


def test_metrics_match_their_definitions():
    target = torch.full((2, 3, 8, 8), -1.0)  # grey level 0
    recon = target.clone()
    recon[0, :, :4] = -1 + 2 * 2 / 255  # 2 grey levels off on the top half of image 0 -> MSE 4 / 2 = 2.0
    mse = metrics.mse_255(recon, target)
    assert torch.allclose(mse, torch.tensor([2.0, 0.0]))
    assert math.isclose(metrics.psnr_from_mse(mse)[0].item(), 10 * math.log10(255**2 / 2.0), rel_tol=1e-6)
    assert metrics.psnr_from_mse(mse)[1] == 100  # perfect reconstruction is capped
    boxes = torch.tensor([[0.0, 4.0, 8.0, 8.0], [0.0, 0.0, 8.0, 8.0]])  # bottom half of image 0: no error there
    m = metrics.reconstruction_metrics(recon, target, boxes)
    assert m["face_psnr"][0] == 100 and m["ssim"][1] == 1.0


def test_tokenizer_table(tiny_manifest, tmp_path):
    a, b = write_tokenizer_ckpt(str(tmp_path / "a.pt")), write_tokenizer_ckpt(str(tmp_path / "b.pt"), seed=3)
    cfg = parse_config(ev.Config, ev.PRESETS, [f"--ckpts={a},{b}", "--names=plain,face", f"--data_dir={tiny_manifest}",
                                               "--image_size=16", "--device=cpu", f"--out={tmp_path}/t.md", "--judge=",
                                               "--what=tokenizer"])
    table = ev.main(cfg)
    rows = table.splitlines()
    assert len(rows) == 4 and rows[2].startswith("| plain |") and rows[3].startswith("| face |")
    assert rows[2].endswith("| - |")  # no judge given: no identity column value
    assert open(tmp_path / "t.md").read().strip() == table


def test_training_curves_png(tmp_path):
    import json

    from PIL import Image

    rows = [{"step": s, "loss": 0.7 - 0.01 * s, "acc": [0.5 + 0.01 * s, 0.5, 0.5 + 0.005 * s], "tok_s": 1.0}
            for s in range(1, 6)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = ev.plot_curves(str(tmp_path / "metrics.jsonl"), str(tmp_path / "c.png"))
    img = Image.open(path).convert("RGB")
    assert img.size == (640, 300)
    assert (0, 0, 0) in {img.getpixel((x, 150)) for x in range(60, 300)}  # the loss line crosses the left panel


def test_generation_table_on_a_tiny_run(tiny_run, tmp_path):
    """End to end: a tiny trained HEAR checkpoint, a random-weight judge, held-out identities with attributes; every
    row is scored by the same judge and every value lies in its range."""
    import json

    import train
    from checkpoint import save_checkpoint
    from data.synthfaces.judge import Judge
    from face_encoder import JudgeGlobalEncoder
    from pipeline import load_run

    data, tok_ckpt, face_ckpt = tiny_run
    attrs = {"background": ["red", "blue"], "clothing": ["red"], "accessory": ["none"], "accessory_color": ["none"],
             "expression": ["neutral"], "position": ["center"], "size": ["small"], "lighting": ["even"],
             "style": ["photo"]}
    records = [json.loads(line) for line in open(f"{data}/manifest.jsonl")]
    with open(f"{data}/manifest.jsonl", "w") as f:
        for r in records:
            r["attributes"] = {k: ("red" if "red" in r["caption_short"] else "blue") if k == "background" else v[0]
                               for k, v in attrs.items()}
            r["crop_path"] = r["path"]  # the reference crop is the image itself in this tiny set
            f.write(json.dumps(r) + "\n")
    out = str(tmp_path / "run")
    judge_config = dict(resolution=16, id_size=16, crop_scale=1.4, embed_dim=8, n_ids=3, attributes=attrs)
    save_checkpoint({"model": Judge(**judge_config).state_dict(), "judge_config": judge_config}, f"{tmp_path}/judge.pt")
    train.main(parse_config(train.Config, train.PRESETS, [  # v_g: the judge's loss embedding, as synthfaces trains
        "--preset=tiny", f"--data_dir={data}", f"--tokenizer_ckpt={tok_ckpt}", f"--face_encoder_ckpt={face_ckpt}",
        f"--out_dir={out}", "--device=cpu", "--max_iters=2", f"--global_face=judge:{tmp_path}/judge.pt"]))
    run = load_run(f"{out}/ckpt.pt")
    assert isinstance(run.global_encoder, JudgeGlobalEncoder) and run.model.hear.cfg.global_face_dim == 8
    cfg = parse_config(ev.Config, ev.PRESETS, ["--what=generation", f"--ckpt={out}/ckpt.pt", f"--data_dir={data}",
                                               f"--judge={tmp_path}/judge.pt", "--prompts_per_identity=1",
                                               "--device=cpu", f"--out={tmp_path}/gen.md"])
    table = ev.main(cfg)
    rows = {line.split("|")[1].strip(): [float(v) for v in line.split("|")[2:5]] for line in table.splitlines()[2:7]}
    assert set(rows) == {"HEAR (face + prompt)", "null face (prompt only)", "real image, same identity (upper bound)",
                         "real image through the tokenizer (its ceiling)", "real image, other identity (chance)"}
    assert all(-1 <= v[0] <= 1 and 0 <= v[1] <= 1 and 0 <= v[2] <= 1 for v in rows.values())
    assert open(f"{tmp_path}/gen.md").read().strip() == table
    # several references (--what=references) on the same run: one held-out identity has the 2 images (1 reference +
    # 1 prompt) it needs, so retrieval among one candidate is always right and every row is there
    cfg = parse_config(ev.Config, ev.PRESETS, ["--what=references", f"--ckpt={out}/ckpt.pt", f"--data_dir={data}",
                                               f"--judge={tmp_path}/judge.pt", "--prompts_per_identity=1",
                                               "--reference_counts=(1,)", "--device=cpu", f"--out={tmp_path}/ref.md"])
    rows = {line.split("|")[1].strip(): [float(v) for v in line.split("|")[2:5]]
            for line in ev.main(cfg).splitlines()[2:4]}
    assert set(rows) == {"null face (prompt only)", "1 ref., mean"}
    assert all(-1 <= v[0] <= 1 and v[1] == 1.0 and 0 <= v[2] <= 1 for v in rows.values())
