"""Several ranks and simulated nodes on one machine (gloo): the same losses and adapter as
one process with the same global batch, for ``sparse`` (both stores, the replicated one
with a copy per node) and ``lora``; a dead
rank fails the run; checkpoints of W ranks resume on W' ranks; start-up checks.

Launchers: two ``deepspeed --num_nodes 2 --no_ssh --node_rank i`` invocations with a
hostfile (DeepSpeed 0.19.8 refuses ``--num_nodes 2`` without one: "Num nodes is >1 but no
extra nodes available via hostfile"), ``torchrun --nnodes 2 --node_rank i``, and
``torchrun --nproc_per_node 2``. The global batch is four micro-batches of one question:
``grad_accum`` = 4 / world size.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_losses, subprocess_env

from meft_ds import dist as mdist
from meft_ds.errors import UserError
from meft_ds.runner import free_port

ROOT = Path(__file__).resolve().parents[1]
PYTHON = [sys.executable]
COMMON = [
    str(ROOT / "launch" / "train.py"), "--deepspeed", str(ROOT / "ds_configs" / "cpu.json"),
    "--max_steps", "3", "--train_examples", "12", "--micro_batch_size", "1",
    "--max_seq_len", "32", "--eval_trained", "0", "--eval_heldout", "0", "--progress", "false",
    "--lr", "3e-3", "--dist_timeout", "60",
]
# No attention LoRA: its B starts at zero, so A's first gradients are near zero and Adam's
# normalised steps turn the ranks' reduction-order rounding into 1e-5..3e-5 differences;
# these tests are about the store (LoRA on several ranks: test_lora_on_two_torchrun_nodes).
SPARSE = ["--method", "sparse", "--layer_start", "28", "--sparse_rank", "256",
          "--sparse_experts", "16", "--sparse_top_k", "8", "--sparse_attn_lora_r", "0"]
LORA = ["--method", "lora", "--lora_r", "4", "--lora_dropout", "0"]  # no per-rank RNG
TIMEOUT = 600


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, env=kw.pop("env", None)
                          or subprocess_env(), timeout=TIMEOUT, cwd=ROOT, **kw)


def _torchrun(nproc: int, nnodes: int = 1, node_rank: int = 0, port: int | None = None):
    return [*PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--nnodes", str(nnodes), "--node_rank", str(node_rank),
            "--master_addr", "127.0.0.1", "--master_port", str(port or free_port())]


def _nodes(commands: list[list[str]], logs: Path) -> list[subprocess.CompletedProcess]:
    """Start one launcher per simulated node at once; wait for all. Output goes to files
    (a full pipe of one node would block it while the other waits in a collective)."""
    logs.mkdir(parents=True, exist_ok=True)
    procs = []
    for n, cmd in enumerate(commands):
        with (logs / f"node{n}.out").open("w") as out, (logs / f"node{n}.err").open("w") as err:
            procs.append(subprocess.Popen(cmd, stdout=out, stderr=err, env=subprocess_env(),
                                          cwd=ROOT))
    done = []
    for n, (cmd, proc) in enumerate(zip(commands, procs)):
        proc.wait(timeout=TIMEOUT)
        done.append(subprocess.CompletedProcess(
            cmd, proc.returncode, (logs / f"node{n}.out").read_text(),
            (logs / f"node{n}.err").read_text(),
        ))
    return done


def _metric(out: Path, key: str) -> float:
    """``key`` of the last step that logged it."""
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in rows if key in r][-1]


def _same_run(out: Path, ref: Path, steps: slice = slice(None)) -> None:
    """Loss trajectory and exported adapter of ``out`` equal ``ref``'s (fp32 tolerance)."""
    from meft_ds.export import read_adapter

    a, b = run_losses(ref)[steps], run_losses(out)[steps]
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert abs(x - y) <= 1e-5 * max(1.0, abs(x)), (a, b)
    if steps == slice(None):
        want, got = (read_adapter(d / "adapter")[1] for d in (ref, out))  # any layout
        assert sorted(want) == sorted(got)
        for key in want:
            assert float((want[key] - got[key]).abs().max()) <= 1e-5, key


def _ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-4000:])


@pytest.fixture(scope="module")
def sparse_ref(tmp_path_factory) -> Path:
    """One process, four micro-batches per step, checkpoints after steps 2 and 3."""
    out = tmp_path_factory.mktemp("sparse_ref")
    _ok(_run([*PYTHON, *COMMON, *SPARSE, "--grad_accum", "4", "--save_steps", "2",
              "--output_dir", str(out)]))
    assert run_losses(out)[0] != run_losses(out)[-1]
    return out


@pytest.mark.multiprocess
@pytest.mark.parametrize("store", ["sharded", "replicated"])
@pytest.mark.xdist_group("sparse_ref")
def test_two_nodes_of_two_ranks(store: str, sparse_ref: Path, tmp_path: Path) -> None:
    """Either store on 2 nodes x 2 ranks; the replicated one keeps one copy per node
    (shared by its two local ranks) and compares the nodes' copies every step."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n127.0.0.1 slots=2\n")
    port = str(free_port())
    launcher = [*PYTHON, "-m", "deepspeed.launcher.runner", "-H", str(hostfile), "--num_nodes",
                "2", "--num_gpus", "2", "--no_ssh", "--master_addr", "127.0.0.1",
                "--master_port", port]
    out = tmp_path / "out"
    args = [*COMMON, *SPARSE, "--sparse_store", store, "--sparse_check_every", "1",
            "--grad_accum", "1", "--output_dir", str(out)]
    for result in _nodes([[*launcher, "--node_rank", str(n), *args] for n in (0, 1)],
                         tmp_path / "logs"):
        _ok(result)
    _same_run(out, sparse_ref)
    files = sorted(p.name for p in (out / "checkpoints").glob("step_*/sparse_*"))
    # sharded: one file per owner (rows 64 each); replicated: one file
    assert len(files) == (4 if store == "sharded" else 1)
    # Host bytes of the store per rank: a quarter (sharded) or half (a copy per node).
    share = _metric(out, "sparse_store_bytes") / _metric(sparse_ref, "sparse_store_bytes")
    assert share == pytest.approx(0.25 if store == "sharded" else 0.5)


@pytest.mark.multiprocess
@pytest.mark.xdist_group("sparse_ref")
def test_dead_rank_fails_then_resume_on_one_rank(sparse_ref: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = [*COMMON, *SPARSE, "--sparse_store", "sharded", "--output_dir", str(out)]
    died = _run([*_torchrun(2), *args, "--grad_accum", "2", "--save_steps", "2",
                 "--stop_after", "2", "--stop_rank", "1"])
    assert died.returncode != 0  # rank 1 left after step 2: rank 0 must not hang
    _same_run(out, sparse_ref, slice(0, 2))  # two sharded ranks == one process
    assert (out / "checkpoints" / "latest").read_text() == "step_0000002"
    resumed = _run([*PYTHON, *args, "--grad_accum", "4", "--resume"])
    _ok(resumed)
    _same_run(out, sparse_ref)


@pytest.mark.multiprocess
@pytest.mark.xdist_group("sparse_ref")
def test_resume_one_rank_checkpoint_on_two_replicated(sparse_ref: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(sparse_ref / "checkpoints" / "step_0000002",
                    out / "checkpoints" / "step_0000002")
    (out / "checkpoints" / "latest").write_text("step_0000002")
    lines = (sparse_ref / "metrics.jsonl").read_text().splitlines()[:2]
    (out / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    _ok(_run([*_torchrun(2), *COMMON, *SPARSE, "--sparse_store", "replicated",
              "--sparse_check_every", "1", "--grad_accum", "2", "--resume",
              "--output_dir", str(out)]))
    _same_run(out, sparse_ref)


@pytest.mark.multiprocess
def test_prefetch_with_the_shared_replicated_store_on_two_ranks(tmp_path: Path) -> None:
    """--sparse_prefetch selects on a worker thread from the node's shared store copy:
    two ranks (replicas compared every step) equal one process with two micro-batches."""
    ref, out = tmp_path / "ref", tmp_path / "out"
    # the eager row update asked for: on in the one process, off with a note on 2 ranks
    prefetch = [*COMMON, *SPARSE, "--sparse_prefetch", "--sparse_eager_update", "true"]
    _ok(_run([*PYTHON, *prefetch, "--grad_accum", "2", "--output_dir", str(ref)]))
    two = _run([*_torchrun(2), *prefetch, "--sparse_store", "replicated",
                "--sparse_check_every", "1", "--grad_accum", "1", "--output_dir", str(out)])
    _ok(two)
    _same_run(out, ref)
    assert "sparse_eager_update is off in this run (2 data-parallel ranks)" in two.stdout
    assert _metric(ref, "sparse_eager_layers") + _metric(ref, "sparse_eager_layers_deferred") == 2
    assert "sparse_eager_layers" not in (out / "metrics.jsonl").read_text()
    assert _metric(out, "sparse_prefetched_layers") == 2  # layers 28 and 29, every step
    assert _metric(out, "sparse_store_bytes") == _metric(ref, "sparse_store_bytes") / 2


@pytest.mark.multiprocess
def test_lora_on_two_torchrun_nodes(tmp_path: Path) -> None:
    ref, out = tmp_path / "ref", tmp_path / "out"
    _ok(_run([*PYTHON, *COMMON, *LORA, "--grad_accum", "2", "--output_dir", str(ref)]))
    port = free_port()
    args = [*COMMON, *LORA, "--grad_accum", "1", "--output_dir", str(out)]
    for result in _nodes([[*_torchrun(1, 2, n, port), *args] for n in (0, 1)],
                         tmp_path / "logs"):
        _ok(result)
    _same_run(out, ref)


@pytest.mark.multiprocess
def test_ranks_with_different_configs_refuse(tmp_path: Path) -> None:
    port = free_port()
    runs = _nodes([
        [*_torchrun(1, 2, n, port), *COMMON, *LORA, "--lr", lr, "--output_dir", str(tmp_path)]
        for n, lr in ((0, "1e-3"), (1, "2e-3"))
    ], tmp_path / "logs")
    for result in runs:
        assert result.returncode != 0
    assert "error: ranks resolved different configurations" in runs[0].stderr


@pytest.mark.unit
def test_multinode_without_master_address_refuses() -> None:
    """The check ``start_process`` runs first (its ``UserError`` exits 2, one line)."""
    env = {"RANK": "2", "LOCAL_RANK": "0", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"}
    with pytest.raises(UserError, match=r"multi-node run \(2 nodes\) without a master address"):
        mdist.check_master_address(env)
    mdist.check_master_address({**env, "MASTER_ADDR": "10.0.0.1"})
    mdist.check_master_address({**env, "LOCAL_WORLD_SIZE": "4"})  # one node: a default is fine
    with pytest.raises(UserError, match=r"\(3 nodes\)"):
        mdist.check_master_address({"CROSS_SIZE": "3"})  # the deepspeed launcher's variable


@pytest.mark.integration
def test_multinode_config_trains(tmp_path: Path) -> None:
    """``ds_configs/multinode.json`` as shipped (bf16, ZeRO-3 base, sparse with the sharded
    store), with small sizes, on one rank: it trains rows and exports."""
    from meft_ds import cli
    from meft_ds.runner import run

    out = tmp_path / "out"
    run(cli.parse([
        "--deepspeed", str(ROOT / "ds_configs" / "multinode.json"), "--output_dir", str(out),
        "--layer_start", "28", "--sparse_param_fraction", "0.01", "--sparse_top_k", "8",
        "--max_steps", "2", "--train_examples", "8", "--micro_batch_size", "2",
        "--max_seq_len", "32", "--eval_trained", "0", "--eval_heldout", "0",
        "--progress", "false",
    ]))
    assert _metric(out, "sparse_rows_updated") > 0
    assert all(math.isfinite(x) for x in run_losses(out)) and len(run_losses(out)) == 2
    assert (out / "adapter" / "adapter.safetensors").exists()
