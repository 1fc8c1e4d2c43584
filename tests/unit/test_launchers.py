"""The launchers in launch/: the SageMaker job request (both paths, in-process and as the CLI),
the in-container entry point, the shell scripts, and one real torchrun run on loopback."""

from __future__ import annotations

import datetime as dt
import importlib.util
import json
import os
import re
import socket
import stat
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.conftest import ROOT, TINY

LAUNCH = ROOT / "launch"
SAGEMAKER = LAUNCH / "sagemaker.py"
TORCHRUN = LAUNCH / "torchrun.sh"
SBATCH = LAUNCH / "slurm.sbatch"
NOW = dt.datetime(2025, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)
# Blocks the SDK (and boto3): what runs under it must never import them.
NO_SDK = "import sys; sys.modules.update(sagemaker=None, boto3=None); "


@pytest.fixture(scope="module")
def sm() -> ModuleType:
    spec = importlib.util.spec_from_file_location("kd_launch_sagemaker", SAGEMAKER)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def request(sm: ModuleType, *argv: str) -> dict:
    return sm.build_job_request(sm.parse_args(["--region", "us-west-2", *argv]), now=NOW)


def run_cli(*argv: str, block_sdk: bool = True) -> subprocess.CompletedProcess:
    code = (NO_SDK if block_sdk else "") + (
        "import runpy; sys.argv = sys.argv[1:]; "
        "runpy.run_path(sys.argv[0], run_name='__main__')")
    return subprocess.run([sys.executable, "-c", code, str(SAGEMAKER), *argv], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


# --- SageMaker: the default path (SDK v3, torchrun) -----------------------------------------

def test_default_path_request(sm: ModuleType) -> None:
    req = request(sm, "--instance-count", "2", "--role", "arn:aws:iam::123456789012:role/kd",
                  "--data", "s3://bucket/imagenet/", "--channel", "teacher=s3://bucket/vitb/",
                  "--", "-c", "configs/my.yaml", "train.epochs=90", "optim.lr=2e-3")
    assert req["TrainingJobName"] == "kd-20250102-030405"
    assert re.fullmatch(r"[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}", req["TrainingJobName"])
    assert req["RoleArn"] == "arn:aws:iam::123456789012:role/kd"
    assert req["AlgorithmSpecification"] == {
        "TrainingImage": "763104351884.dkr.ecr.us-west-2.amazonaws.com/"
                         "pytorch-training:2.8.0-gpu-py312",
        "TrainingInputMode": "File"}
    assert req["ResourceConfig"] == {"InstanceType": "ml.p4d.24xlarge", "InstanceCount": 2,
                                     "VolumeSizeInGB": 200}
    assert req["StoppingCondition"] == {"MaxRuntimeInSeconds": 86400}
    assert req["EnableManagedSpotTraining"] is False
    assert "CheckpointConfig" not in req
    assert [c["ChannelName"] for c in req["InputDataConfig"]] == ["train", "teacher"]
    s3 = req["InputDataConfig"][0]["DataSource"]["S3DataSource"]
    assert s3 == {"S3DataType": "S3Prefix", "S3Uri": "s3://bucket/imagenet/",
                  "S3DataDistributionType": "FullyReplicated"}
    # p4d: EFA with GPUDirect RDMA; never NCCL_PROTO or RDMAV_* (see launch/sagemaker.py)
    env = req["Environment"]
    assert env["FI_PROVIDER"] == "efa" and env["FI_EFA_USE_DEVICE_RDMA"] == "1"
    assert not any(k == "NCCL_PROTO" or k.startswith("RDMAV_") for k in env)

    kd = req["kd"]
    args = ["-c", "configs/my.yaml", "data.root=/opt/ml/input/data/train",
            "output_dir=/opt/ml/model", "train.epochs=90", "optim.lr=2e-3"]
    assert kd["kd_args"] == args
    assert json.loads(req["HyperParameters"]["kd_args"]) == args
    assert kd["rank_command"] == ["python", "-m", "kd.cli", "train", *args]
    assert kd["mode"] == "torchrun"
    assert kd["distribution"] == {"torchrun": {"process_count_per_node": None}}
    assert (kd["processes_per_node"], kd["world_size"]) == (8, 16)
    assert kd["node_command"][:3] == ["torchrun", "--nnodes=2", "--nproc_per_node=8"]
    assert "--node_rank=$SM_CURRENT_HOST_RANK" in kd["node_command"]
    assert kd["node_command"][-3:] == ["launch/sagemaker.py", "--kd_args",
                                       req["HyperParameters"]["kd_args"]]
    assert kd["channels"] == {"train": "/opt/ml/input/data/train",
                              "teacher": "/opt/ml/input/data/teacher"}
    assert kd["source_dir"] == str(ROOT) and kd["entry_script"] == "launch/sagemaker.py"


def test_spot_and_checkpoints(sm: ModuleType) -> None:
    req = request(sm, "--spot", "--checkpoint-s3", "s3://bucket/kd/run1/", "--max-run", "3600",
                  "--", "checkpoint.every_steps=500")
    assert req["EnableManagedSpotTraining"] is True
    assert req["StoppingCondition"] == {"MaxRuntimeInSeconds": 3600, "MaxWaitTimeInSeconds": 7200}
    assert req["CheckpointConfig"] == {"S3Uri": "s3://bucket/kd/run1/",
                                       "LocalPath": "/opt/ml/checkpoints"}
    # the synced folder is kd's output_dir, and a restarted job resumes from it
    assert req["kd"]["kd_args"] == ["output_dir=/opt/ml/checkpoints", "checkpoint.resume=auto",
                                    "checkpoint.every_steps=500"]
    req = request(sm, "--spot", "--checkpoint-s3", "s3://bkt/c", "--max-run", "100",
                  "--max-wait", "150")
    assert req["StoppingCondition"]["MaxWaitTimeInSeconds"] == 150


def test_single_node_and_other_instances(sm: ModuleType) -> None:
    req = request(sm, "--instance-type", "ml.g5.2xlarge", "--nproc-per-node", "1",
                  "--framework-version", "2.5.1", "--env", "NCCL_DEBUG=INFO")
    assert req["AlgorithmSpecification"]["TrainingImage"].endswith(":2.5.1-gpu-py311")
    assert req["Environment"] == {"PYTHONUNBUFFERED": "1", "NCCL_DEBUG": "INFO"}  # no EFA
    node = req["kd"]["node_command"]
    assert node[:3] == ["torchrun", "--nnodes=1", "--nproc_per_node=1"]
    assert not any(a.startswith("--master_addr") for a in node)
    assert req["kd"]["distribution"] == {"torchrun": {"process_count_per_node": 1}}
    env = request(sm, "--instance-type", "ml.p3dn.24xlarge")["Environment"]
    assert env["FI_PROVIDER"] == "efa" and "FI_EFA_USE_DEVICE_RDMA" not in env


def test_passthrough_order(sm: ModuleType) -> None:
    """The preset first (kd's parser needs the overrides in one group), the launcher's overrides,
    then the user's, which win."""
    req = request(sm, "--data", "s3://bkt/d", "--", "train.epochs=3", "--config=p.yaml",
                  "data.root=/opt/ml/input/data/train/sub")
    assert req["kd"]["kd_args"] == ["-c", "p.yaml", "data.root=/opt/ml/input/data/train",
                                    "output_dir=/opt/ml/model", "train.epochs=3",
                                    "data.root=/opt/ml/input/data/train/sub"]


# --- SageMaker: SMDDP (SDK v2, mpirun) ------------------------------------------------------

def test_smddp_request(sm: ModuleType) -> None:
    req = request(sm, "--smddp", "--instance-type", "ml.p4de.24xlarge", "--instance-count", "4",
                  "--data", "s3://bucket/imagenet/", "--", "-c", "configs/my.yaml", "seed=1")
    assert req["AlgorithmSpecification"]["TrainingImage"] == (
        "658645717510.dkr.ecr.us-west-2.amazonaws.com/"
        "smdistributed-modelparallel:2.4.1-gpu-py311-cu121")
    assert req["ResourceConfig"]["InstanceType"] == "ml.p4de.24xlarge"
    assert req["ResourceConfig"]["InstanceCount"] == 4
    kd = req["kd"]
    assert kd["mode"] == "smddp"
    assert kd["distribution"] == {"smdistributed": {"dataparallel": {"enabled": True}}}
    assert kd["kd_args"] == ["-c", "configs/my.yaml", "data.root=/opt/ml/input/data/train",
                             "output_dir=/opt/ml/model", "dist.backend=smddp", "seed=1"]
    assert (kd["processes_per_node"], kd["world_size"]) == (8, 32)
    node = kd["node_command"]
    assert node[0] == "mpirun" and "smddprun" in node and "-np" in node
    assert node[node.index("-np") + 1] == "32"
    assert node[-3:] == ["launch/sagemaker.py", "--kd_args", req["HyperParameters"]["kd_args"]]
    assert "sagemaker<3" in kd["sdk"]
    image = "123456789012.dkr.ecr.us-west-2.amazonaws.com/kd:smddp"
    custom = request(sm, "--smddp", "--image-uri", image)
    assert custom["AlgorithmSpecification"]["TrainingImage"] == image


def test_smddp_instances_agree_with_kds_automatic_choice(sm: ModuleType) -> None:
    """--smddp is offered on the instances where dist.backend=auto would pick smddp."""
    from kd.core.dist import SMDDP_INSTANCE_TYPES

    assert set(sm.SMDDP_INSTANCE_TYPES) == set(SMDDP_INSTANCE_TYPES)


@pytest.mark.parametrize(("argv", "message"), [
    (["--smddp", "--instance-type", "ml.p5.48xlarge"], "--smddp needs --instance-type"),
    (["--smddp", "--instance-type", "ml.g5.48xlarge"], "--smddp needs --instance-type"),
    (["--smddp", "--nproc-per-node", "4"], "SMDDP always runs 8"),
    (["--smddp", "--framework-version", "2.2.0"], "kd needs PyTorch >= 2.4"),
    (["--framework-version", "1.13.1"], "choose one of"),
    (["--image-uri", "x:1", "--framework-version", "2.8.0"], "not both"),
    (["--instance-type", "p4d.24xlarge"], "--instance-type"),
    (["--channel", "train:s3://bkt/d"], "expected NAME=S3URI"),
    (["--channel", "train=/local/path"], "is not an S3 URI"),
    (["--channel", "bad name=s3://bkt/d"], "channel name"),
    (["--channel", "code=s3://bkt/d"], "reserved"),
    (["--data", "s3://bkt/d", "--channel", "train=s3://bkt/e"], "given twice"),
    (["--checkpoint-s3", "bucket/path"], "is not an S3 URI"),
    (["--spot"], "--spot needs --checkpoint-s3"),
    (["--max-wait", "10"], "add --spot"),
    (["--spot", "--checkpoint-s3", "s3://bkt/c", "--max-run", "100", "--max-wait", "50"],
     "must be >= --max-run"),
    (["--max-run", str(29 * 24 * 3600)], "28 days"),
    (["--env", "1BAD=x"], "--env"),
    (["--job-name", "kd_run"], "--job-name"),
    (["--role", "my-role"], "--role"),
    (["--source-dir", "/"], "must contain launch/sagemaker.py"),
    (["--", "--epochs", "3"], "takes -c PRESET and key=value"),
    (["--", "epochs"], "not of the form key=value"),
    (["--", "-c"], "needs a preset path"),
    (["--instance-count", "0"], "must be >= 1"),
])
def test_user_errors(sm: ModuleType, argv: list[str], message: str) -> None:
    with pytest.raises(sm.LaunchError, match=re.escape(message)):
        request(sm, *argv)


def test_submit_without_sdk_names_the_install(sm: ModuleType,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sagemaker", None)
    role = ["--role", "arn:aws:iam::123456789012:role/kd"]
    with pytest.raises(sm.LaunchError, match=re.escape('pip install "kd[sagemaker]"')):
        sm.submit(sm.parse_args(role))
    with pytest.raises(sm.LaunchError, match=re.escape('pip install "sagemaker<3"')):
        sm.submit(sm.parse_args([*role, "--smddp"]))
    with pytest.raises(sm.LaunchError, match="--role is required"):
        sm.submit(sm.parse_args([]))


# --- SageMaker: the command line ------------------------------------------------------------

def test_cli_dry_run_both_paths_without_sdk() -> None:
    for extra, mode in (([], "torchrun"), (["--smddp"], "smddp")):
        result = run_cli("--dry-run", *extra, "--instance-count", "2", "--data", "s3://bkt/d/",
                         "--checkpoint-s3", "s3://bkt/ckpt/", "--spot", "--",
                         "-c", "configs/tiny.yaml", "train.epochs=1")
        assert result.returncode == 0, result.stderr
        req = json.loads(result.stdout)
        assert req["kd"]["mode"] == mode
        assert req["ResourceConfig"]["InstanceCount"] == 2
        assert req["EnableManagedSpotTraining"] is True
        assert req["CheckpointConfig"]["LocalPath"] == "/opt/ml/checkpoints"
        assert "train.epochs=1" in req["kd"]["rank_command"]


def test_cli_user_errors_are_one_line_exit_2() -> None:
    for argv in (["--dry-run", "--smddp", "--instance-type", "ml.p5.48xlarge"],
                 ["--dry-run", "--channel", "nonsense"],
                 ["--dry-run", "--max-run", "soon"],
                 ["--data", "s3://bkt/d/"]):  # not a dry run: --role is required
        result = run_cli(*argv)
        assert result.returncode == 2, (argv, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("launch/sagemaker.py: error: "), lines
        assert result.stdout == ""


def test_cli_help_without_sdk() -> None:
    result = run_cli("--help")
    assert result.returncode == 0, result.stderr
    assert "--smddp" in result.stdout and "--checkpoint-s3" in result.stdout


# --- SageMaker: the entry point inside the container ----------------------------------------

def test_container_entry(sm: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    import kd.cli

    seen: dict = {}

    def fake_main(argv: list[str]) -> int:
        seen.update(argv=argv, master=os.environ.get("MASTER_ADDR"),
                    ifname=os.environ.get("NCCL_SOCKET_IFNAME"))
        return 0

    monkeypatch.setattr(kd.cli, "main", fake_main)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the entry point prepends the source dir
    for var in ("MASTER_ADDR", "NCCL_SOCKET_IFNAME"):  # absent now, and again after the test
        monkeypatch.setenv(var, "x")
        monkeypatch.delenv(var)
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "3")  # the SMDDP (mpirun) path
    monkeypatch.setenv("SM_HOSTS", '["algo-2", "algo-1"]')
    monkeypatch.setenv("SM_NETWORK_INTERFACE_NAME", "eth0")
    kd_args = ["-c", "p.yaml", "dist.backend=smddp"]
    twice = json.dumps(json.dumps(kd_args))  # SDKs may encode the hyperparameter once more
    assert sm.main(["--kd_args", twice]) == 0
    assert seen == {"argv": ["train", *kd_args], "master": "algo-1", "ifname": "eth0"}
    with pytest.raises(sm.LaunchError):
        sm._decode_kd_args('{"not": "a list"}')


# --- shell scripts --------------------------------------------------------------------------

@pytest.mark.parametrize("script", [TORCHRUN, SBATCH])
def test_shell_syntax(script: Path) -> None:
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert os.access(script, os.X_OK)


def test_torchrun_help_and_errors() -> None:
    result = subprocess.run([str(TORCHRUN), "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "NPROC_PER_NODE" in result.stdout
    env = {**os.environ, "NNODES": "2"}
    env.pop("MASTER_ADDR", None)
    result = subprocess.run([str(TORCHRUN), "-c", "x.yaml"], env=env, capture_output=True,
                            text=True)
    assert result.returncode == 2 and "needs MASTER_ADDR" in result.stderr


def _stub(path: Path, body: str) -> None:
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_sbatch_runs_torchrun_sh_per_node(tmp_path: Path) -> None:
    """slurm.sbatch under stand-ins for scontrol, srun and python: what each node would run."""
    _stub(tmp_path / "scontrol", 'printf "gpu-a\\ngpu-b\\n"\n')
    # srun: drop its options, run the task as node 1 of the allocation
    _stub(tmp_path / "srun", 'while [[ $1 == -* ]]; do shift; done\nSLURM_NODEID=1 exec "$@"\n')
    _stub(tmp_path / "python", 'printf "%s\\n" "$@"\n')
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}",
           "PYTHON": str(tmp_path / "python"), "SLURM_SUBMIT_DIR": str(ROOT),
           "SLURM_JOB_NODELIST": "gpu-[a-b]", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_ID": "77",
           "SLURM_GPUS_ON_NODE": "8", "SLURM_CPUS_PER_TASK": "96"}
    for var in ("MASTER_ADDR", "MASTER_PORT", "NNODES", "NPROC_PER_NODE", "NODE_RANK", "RDZV_ID"):
        env.pop(var, None)
    result = subprocess.run(["bash", str(SBATCH), "-c", "my job.yaml", "train.epochs=3"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    args = result.stdout.splitlines()
    assert args[:2] == ["-m", "torch.distributed.run"]
    pairs = dict(zip(args[2:-6:2], args[3:-6:2]))
    assert pairs["--nnodes"] == "2" and pairs["--nproc-per-node"] == "8"
    assert pairs["--rdzv-backend"] == "c10d" and pairs["--rdzv-endpoint"] == "gpu-a:29500"
    assert pairs["--rdzv-id"] == "77" and pairs["--rdzv-conf"] == "is_host=false"  # node 1
    assert args[-6:] == ["-m", "kd.cli", "train", "-c", "my job.yaml", "train.epochs=3"]


# --- a real run -----------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.multiproc
def test_torchrun_sh_two_ranks(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK",
                        "RDZV_ENDPOINT", "RDZV_ID", "CUDA_VISIBLE_DEVICES")}
    env.update(NNODES="1", NPROC_PER_NODE="2", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(_free_port()), OMP_NUM_THREADS="1", PYTHON=sys.executable,
               PYTHONUNBUFFERED="1")
    out = tmp_path / "run"
    result = subprocess.run(
        [str(TORCHRUN), "-c", TINY, "distill.loss=none", "teacher.checkpoint=null",
         f"output_dir={out}", "train.device=cpu"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2
