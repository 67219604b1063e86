"""bench.py runs end to end at tiny sizes and reports the numbers it claims to (not a timing test)."""

import json

import bench
from common import parse_config


def test_bench_reports_each_measurement(tmp_path):
    out = tmp_path / "bench.jsonl"
    cfg = parse_config(bench.Config, bench.PRESETS, ["--image_size=16", "--patch_size=2", "--vae_ch_mult=(1,1)",
                                                     "--depth=1", "--embed_dim=64", "--batch_size=2", "--face_size=16",
                                                     "--warmup=1", "--iters=1", "--device=cpu", f"--out={out}"])
    results = bench.main(cfg)
    assert [r["what"] for r in results] == ["train_step", "sample", "vae"]
    assert results[0]["tokens_per_image"] == 121 and results[0]["tokens_per_s"] > 0 and results[0]["mfu"] is None
    assert results[1]["scales"] == 5 and results[2]["pixels"] == "16x16"
    assert [json.loads(line) for line in out.read_text().splitlines()] == results
