"""Real multi-process runs over gloo on loopback: torchrun, two "nodes", parity, ZeRO resume,
and the SMDDP path through a stand-in backend."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tests.multiproc.helpers import (
    ATOL,
    free_port,
    keep_only_checkpoint,
    launch_env,
    max_diff,
    ok,
    single,
    torchrun,
    weights,
)

pytestmark = pytest.mark.multiproc

def test_torchrun_two_processes_zero_matches_one_process(base, reference, tmp_path):
    out = tmp_path / "run"
    result = ok(torchrun(2, *base, f"output_dir={out}", "data.batch_size=8", "optim.zero=true"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["backend"] == "gloo"
    assert summary["steps"] == json.loads((reference / "summary.json").read_text())["steps"]
    # rank 0 alone writes and prints: one results table, one metrics line per log step
    assert result.stdout.count("distillation results") == 1
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if "split" not in json.loads(line)]
    assert steps == sorted(set(steps))
    assert max_diff(weights(out), weights(reference)) < ATOL


def test_two_nodes_rendezvous_on_loopback(base, reference, tmp_path):
    out, port = tmp_path / "run", free_port()
    nodes = [torchrun(1, *base, f"output_dir={out}", "data.batch_size=8", nnodes=2, node_rank=r,
                      port=port, wait=False) for r in (0, 1)]
    logs = [p.communicate(timeout=600)[0] for p in nodes]
    for p, log in zip(nodes, logs):
        assert p.returncode == 0, log[-3000:]
    assert json.loads((out / "summary.json").read_text())["world_size"] == 2
    assert max_diff(weights(out), weights(reference)) < ATOL


@pytest.mark.parametrize("first, second", [(2, 1), (1, 2)])
def test_zero_checkpoint_resumes_at_another_world_size(base, reference, tmp_path, first, second):
    """Stop at step 6 (mid-epoch) at one world size, finish at another, same global batch."""
    out = tmp_path / "run"
    args = [*base, f"output_dir={out}", "optim.zero=true", "checkpoint.every_steps=6"]
    batch = {1: "data.batch_size=16", 2: "data.batch_size=8"}

    def train(world: int) -> subprocess.CompletedProcess:
        extra = (*args, batch[world])
        return ok(torchrun(2, *extra) if world == 2 else single(*extra))

    train(first)
    keep_only_checkpoint(out, 6)
    resumed = train(second)
    assert "resumed from" in resumed.stderr + resumed.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 16 and summary["world_size"] == second
    assert max_diff(weights(out), weights(reference)) < ATOL


SMDDP_STANDIN = '''
"""Stand-in for SageMaker's SMDDP: registers an "smddp" backend that is really gloo, and refuses
what AWS documents the real one cannot do: a second process group (new_group), which is also the
only way to run another backend beside it
(https://docs.aws.amazon.com/sagemaker/latest/dg/data-parallel-modify-sdp-pt.html)."""
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

def _create(store, rank, world_size, timeout):
    return dist.ProcessGroupGloo(store, rank, world_size, timeout)

dist.Backend.register_backend("smddp", _create, devices=["cpu"])

_new_group = c10d.new_group

def _refuse_new_group(*args, **kwargs):
    if dist.is_initialized() and dist.get_backend() == "smddp":
        raise RuntimeError("smddp stand-in: new_group() is not supported by the smddp backend")
    return _new_group(*args, **kwargs)

dist.new_group = c10d.new_group = _refuse_new_group
'''


def test_smddp_path_under_mpi_variables(base, reference, tmp_path):
    """SageMaker + Open MPI variables, no RANK: kd reads the MPI layout, uses smddp, trains."""
    pkg = tmp_path / "site" / "smdistributed" / "dataparallel" / "torch"
    pkg.mkdir(parents=True)
    for d in (pkg.parent.parent, pkg.parent, pkg):
        (d / "__init__.py").write_text("")
    (pkg / "torch_smddp.py").write_text(SMDDP_STANDIN)
    out, port = tmp_path / "run", free_port()
    procs = []
    for rank in range(2):
        env = launch_env({"PYTHONPATH": f"{tmp_path / 'site'}{os.pathsep}{ROOT}",
                    "OMPI_COMM_WORLD_RANK": str(rank), "OMPI_COMM_WORLD_SIZE": "2",
                    "OMPI_COMM_WORLD_LOCAL_RANK": str(rank), "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
                    "SM_HOSTS": '["localhost"]', "SM_CURRENT_HOST": "localhost",
                    "SM_NUM_GPUS": "0", "MASTER_PORT": str(port)})
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "kd.cli", "train", *base, f"output_dir={out}",
             "data.batch_size=8", "dist.backend=smddp"],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=600)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["backend"] == "smddp" and summary["world_size"] == 2
    assert max_diff(weights(out), weights(reference)) < ATOL


FEATURES = ["distill.features=[{student: 0, teacher: 0}, {student: -1, teacher: -1, loss: mse, "
            "tokens: pooled, weight: 0.5}]", "optim.layer_decay=0.6"]


@pytest.mark.parametrize("strategy, both", [
    (["optim.zero=true"], ["data.repeated_aug=2", "train.max_steps=16"]),
    (["dist.strategy=deepspeed", "dist.zero_stage=2"], [])], ids=["ddp-zero", "deepspeed-2"])
def test_feature_pairs_and_layer_decay_in_two_processes_match_one(base, tmp_path, strategy,
                                                                  both):
    """The projectors live in the module the strategy wraps: synchronised and sharded like the
    student, so two processes train the same student (and projectors) as one; the layer-decay
    groups (optim.layer_decay) survive ZeRO's and DeepSpeed's sharding; repeated augmentation
    (data.repeated_aug) gives a step of two ranks the same copies as a step of one."""
    if "dist.strategy=deepspeed" in strategy:
        pytest.importorskip("deepspeed", reason="the deepspeed extra is part of .[dev]")
    one, two = tmp_path / "one", tmp_path / "two"
    ok(single(*base, *FEATURES, *both, f"output_dir={one}", "data.batch_size=16"))
    ok(torchrun(2, *base, *FEATURES, *strategy, *both, f"output_dir={two}",
                "data.batch_size=8"))
    assert max_diff(weights(two), weights(one)) < ATOL
    records = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    assert all(r["loss_feat_1"] is not None for r in records if "split" not in r)
