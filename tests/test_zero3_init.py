"""ZeRO-3 partitioned loading on two ranks (``torchrun --nproc_per_node 2``, gloo): right
after ``from_pretrained`` each rank holds its half of every weight, never the model; the
run then trains as the same run under ZeRO-0 (losses, exported adapter)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import rank_errors, run_losses, subprocess_env
from test_loading import tiny_checkpoint

from meft_ds.export import read_adapter
from meft_ds.runner import free_port

ROOT = Path(__file__).resolve().parents[1]
# each rank records what load_model handed the runner, then trains as launch/train.py
DRIVER = """
import json, os, sys
from meft_ds import cli
from meft_ds.models import loader

real = loader.load_model

def spy(*args, **kwargs):
    loaded = real(*args, **kwargs)
    params = list(loaded.model.parameters())
    # a partitioned weight keeps its share in ds_tensor; its data is then empty
    record = {"local": sum(getattr(p, "ds_tensor", p).numel() for p in params),
              "data": sum(p.numel() for p in params),
              "whole": sum(getattr(p, "ds_numel", p.numel()) for p in params),
              "tensors": len(params),
              "partitioned": sum(hasattr(p, "ds_id") for p in params)}
    with open(os.path.join(sys.argv[1], "load%s.json" % os.environ["RANK"]), "w") as f:
        json.dump(record, f)
    return loaded

loader.load_model = spy
sys.exit(cli.main(sys.argv[2:]))
"""


def _train(tmp_path: Path, model: Path, stage: int) -> Path:
    """Three LoRA steps of a global batch of 4 on 2 ranks under ZeRO ``stage``; returns
    the output directory (with each rank's load record)."""
    config = json.loads((ROOT / "ds_configs" / "cpu.json").read_text())
    # every tensor partitioned, however small (the default keeps those under 1e5 whole)
    config["zero_optimization"] = {"stage": stage, "stage3_param_persistence_threshold": 0}
    path = tmp_path / f"zero{stage}.json"
    path.write_text(json.dumps(config))
    out = tmp_path / f"run{stage}"
    out.mkdir()
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(driver),
           str(out), "--deepspeed", str(path), "--model", str(model), "--method", "lora",
           "--lora_r", "4", "--lora_dropout", "0", "--output_dir", str(out),
           "--max_steps", "3", "--train_examples", "12", "--micro_batch_size", "1",
           "--grad_accum", "2", "--max_seq_len", "32", "--eval_trained", "0",
           "--eval_heldout", "0", "--progress", "false", "--lr", "1e-2",
           "--save_final", "false", "--dist_timeout", "60"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(),
                            timeout=300, cwd=ROOT)
    assert result.returncode == 0, rank_errors(result.stdout + result.stderr)
    return out


@pytest.mark.multiprocess
def test_zero3_loads_partitioned_and_trains_as_zero0(tmp_path: Path) -> None:
    model = tiny_checkpoint(tmp_path / "model")
    zero3, zero0 = _train(tmp_path, model, 3), _train(tmp_path, model, 0)
    loads = {stage: [json.loads((out / f"load{r}.json").read_text()) for r in (0, 1)]
             for stage, out in ((3, zero3), (0, zero0))}
    whole = loads[0][0]["whole"]
    # ZeRO-0: each rank loads the whole model, as before
    assert all(x["local"] == x["data"] == x["whole"] == whole and x["partitioned"] == 0
               for x in loads[0])
    # ZeRO-3: every tensor partitioned on load; a rank holds half of each (padded to an
    # even size: at most one element more per tensor); no whole weight stays gathered
    for x in loads[3]:
        assert x["whole"] == whole and x["partitioned"] == x["tensors"] and x["data"] == 0
        assert whole / 2 <= x["local"] <= whole / 2 + x["tensors"], (x, whole)
    # the same losses and adapter as ZeRO-0. Measured: the losses bit-exact, the adapter
    # within 1.5e-7 (fp32 gradients reduced in another order: reduce-scatter, not
    # all-reduce); the bounds leave room for another machine's summation order
    a, b = run_losses(zero0), run_losses(zero3)
    assert len(a) == len(b) == 3 and a[0] != a[-1]
    for x, y in zip(a, b, strict=True):
        assert abs(x - y) <= 1e-6 * abs(x), (a, b)
    want, got = (read_adapter(out / "adapter")[1] for out in (zero0, zero3))
    assert sorted(want) == sorted(got)
    for key in want:
        assert float((want[key] - got[key]).abs().max()) <= 1e-5, key
