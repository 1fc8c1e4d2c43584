#!/usr/bin/env python3
"""Submit ``kd train`` as an Amazon SageMaker training job on one or more GPU instances.

    python launch/sagemaker.py --role ROLE_ARN --instance-count 2 \\
        --image-uri ACCOUNT.dkr.ecr.REGION.amazonaws.com/kd:latest \\
        --data s3://bucket/imagenet/ --checkpoint-s3 s3://bucket/kd/run1/ --spot \\
        -- -c configs/my_job.yaml train.epochs=100

Everything after ``--`` is passed to ``kd train`` (``-c preset.yaml`` and ``key=value``
overrides). Two paths:

- default: SageMaker Python SDK v3 (``pip install "kd[sagemaker]"``):
  ``sagemaker.train.ModelTrainer`` with ``sagemaker.train.distributed.Torchrun``. Every instance
  runs torchrun with one rank per GPU; kd reads torchrun's variables and uses NCCL.
- ``--smddp``: SageMaker's data-parallel library (SMDDP), which needs SDK v2 (``pip install
  "sagemaker<3"``; v3 removed ``sagemaker.pytorch``): ``sagemaker.pytorch.PyTorch`` with
  ``distribution={"smdistributed": {"dataparallel": {"enabled": True}}}``. The training toolkit
  starts 8 ranks per instance with mpirun + smddprun; kd reads the Open MPI variables and runs
  with ``dist.backend=smddp``.

``--dry-run`` prints the CreateTrainingJob-shaped request as JSON without importing the SDK,
without credentials and without network. The same file is the job's entry point inside the
container (``launch/sagemaker.py --kd_args JSON``), where it runs ``kd train`` in each rank.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

REPO_ROOT = Path(__file__).resolve().parents[1]
ENTRY_SCRIPT = "launch/sagemaker.py"  # relative to the source dir, which holds this repository
CONTAINER_FLAG = "--kd_args"  # the "kd_args" hyperparameter reaches the entry point as a flag
CHANNEL_ROOT = "/opt/ml/input/data"  # channel NAME at CHANNEL_ROOT/NAME (= $SM_CHANNEL_NAME)
CHECKPOINT_LOCAL_PATH = "/opt/ml/checkpoints"  # synced to --checkpoint-s3 while the job runs
MODEL_DIR = "/opt/ml/model"  # uploaded as model.tar.gz when the job ends
MAX_RUNTIME_LIMIT_S = 28 * 24 * 3600  # CreateTrainingJob's maximum MaxRuntimeInSeconds

# PyTorch training containers (Deep Learning Containers, "DLC") that the default path uses when
# no --image-uri is given: framework version -> Python tag, as listed in the SageMaker SDK's
# image_uri_config/pytorch.json (sagemaker-core 2.x). kd needs torch >= 2.4. Image:
# 763104351884.dkr.ecr.REGION.amazonaws.com/pytorch-training:VERSION-gpu-PY (the DLC account of
# most commercial regions; elsewhere pass --image-uri). The DLCs lack timm and omegaconf: see
# requirements.txt under "SageMaker" in the README, or use an image with kd installed.
DLC_PY_VERSIONS = {"2.4.0": "py311", "2.5.1": "py311", "2.6.0": "py312", "2.7.1": "py312",
                   "2.8.0": "py312", "2.9.0": "py312", "2.10.0": "py313"}
DLC_ACCOUNT = "763104351884"
DEFAULT_FRAMEWORK_VERSION = "2.8.0"

# SMDDP. SDK v2 (2.257) validates smdistributed dataparallel framework versions only up to
# PyTorch 2.2.0 (fw_utils.SM_DATAPARALLEL_SUPPORTED_FRAMEWORK_VERSIONS: ..., 2.0.1, 2.1.0, 2.1.2,
# 2.2.0): those DLCs ship SMDDP but are older than kd's torch >= 2.4. SMDDP v2.5.0 supports
# PyTorch 2.4.1 and ships in the SageMaker model parallelism (SMP) v2 image below (AWS: "SageMaker
# AI data parallelism library release notes", SMDDP v2.5.0, 2024-10-17), so that is the default;
# --image-uri takes any other image that ships smdistributed-dataparallel.
SMDDP_IMAGES = {
    "2.4.1": "658645717510.dkr.ecr.{region}.amazonaws.com/"
             "smdistributed-modelparallel:2.4.1-gpu-py311-cu121",
}
DEFAULT_SMDDP_FRAMEWORK_VERSION = "2.4.1"
# AWS documents SMDDP for P4 and P4de instances. SDK v2 refuses smdistributed on ml.p5.48xlarge
# ("SMModelParallel and SMDataParallel currently do not support p5 instances", estimator.py);
# use the default torchrun path (NCCL over EFA) there.
SMDDP_INSTANCE_TYPES = ("ml.p4d.24xlarge", "ml.p4de.24xlarge")
SMDDP_PROCS_PER_NODE = 8  # the toolkit's smddprun always starts 8 ranks per instance

GPUS_PER_INSTANCE = {
    "ml.p3.16xlarge": 8, "ml.p3dn.24xlarge": 8, "ml.p4d.24xlarge": 8, "ml.p4de.24xlarge": 8,
    "ml.p5.48xlarge": 8, "ml.p5e.48xlarge": 8, "ml.p5en.48xlarge": 8,
    "ml.g5.12xlarge": 4, "ml.g5.24xlarge": 4, "ml.g5.48xlarge": 8,
    "ml.g6.12xlarge": 4, "ml.g6.24xlarge": 4, "ml.g6.48xlarge": 8,
    "ml.g6e.12xlarge": 4, "ml.g6e.24xlarge": 4, "ml.g6e.48xlarge": 8,
}

# EFA. aws-ofi-nccl's EFA cheatsheet (aws/aws-ofi-nccl doc/efa-env-var.md): FI_PROVIDER=efa and
# NCCL_PROTO=simple are needed only with aws-ofi-nccl <= 1.5.0; FI_EFA_USE_DEVICE_RDMA=1 only
# with aws-ofi-nccl 1.6.x on p4/p5 (not with libfabric >= 1.18 and aws-ofi-nccl >= 1.7, where
# it is harmless); RDMAV_FORK_SAFE=1 should not be set. Current plugins pick the EFA provider
# and set NCCL_PROTO themselves where a platform needs it. kd sets the two harmless ones on EFA
# instances so that images with older plugins work too, and never NCCL_PROTO (the plugin decides;
# aws-ofi-nccl PR 280 stopped forcing "simple" on p5) nor RDMAV_*. NCCL_SOCKET_IFNAME (the
# bootstrap interface) comes from SM_NETWORK_INTERFACE_NAME: both SageMaker launchers set it, and
# the entry point below too. Note that the launchers add their own: SDK v3's torchrun driver
# exports FI_PROVIDER=efa on EFA instances, FI_EFA_USE_DEVICE_RDMA=1 and RDMAV_FORK_SAFE=1 on
# p4d/p4de, and NCCL_PROTO=simple everywhere (sagemaker-train 1.27 torchrun_driver.py); the
# toolkit's SMDDP runner passes FI_PROVIDER=efa and RDMAV_FORK_SAFE=1 to every rank.
EFA_INSTANCE_TYPES = ("ml.g4dn.8xlarge", "ml.g4dn.12xlarge", "ml.g5.48xlarge", "ml.p3dn.24xlarge",
                      "ml.p4d.24xlarge", "ml.p4de.24xlarge", "ml.p5.48xlarge", "ml.p5e.48xlarge",
                      "ml.p5en.48xlarge")
EFA_RDMA_INSTANCE_TYPES = ("ml.p4d.24xlarge", "ml.p4de.24xlarge", "ml.p5.48xlarge",
                           "ml.p5e.48xlarge", "ml.p5en.48xlarge")

V3_RESERVED_CHANNELS = ("code", "sm_drivers")  # ModelTrainer's own channels
UPLOAD_IGNORE = [".env", ".git", "__pycache__", ".DS_Store", ".cache", ".ipynb_checkpoints",
                 "runs", ".pytest_cache", ".ruff_cache", ".benchmarks", "*.egg-info", ".venv"]

_NAME = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9])*$")
_CHANNEL = re.compile(r"^[A-Za-z0-9.\-_]{1,64}$")
_S3 = re.compile(r"^s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/.*)?$")
_INSTANCE = re.compile(r"^ml\.[a-z0-9-]+\.[a-z0-9]+$")
_ROLE = re.compile(r"^arn:aws[a-z\-]*:iam::\d{12}:role/\S+$")
_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class LaunchError(Exception):
    """A mistake in the command line: one line on stderr, exit code 2."""


# --- command line ---------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, no usage block
        raise LaunchError(message)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="launch/sagemaker.py",
        description="Submit `kd train` as a SageMaker training job (default: SDK v3 ModelTrainer "
                    "+ torchrun; --smddp: SDK v2 PyTorch estimator + SMDDP). Arguments after "
                    "`--` go to `kd train`.",
        epilog="example: launch/sagemaker.py --dry-run --instance-count 2 --data s3://b/imagenet/ "
               "--checkpoint-s3 s3://b/kd/run1/ --spot -- -c configs/my_job.yaml train.epochs=90")
    p.add_argument("--instance-type", default="ml.p4d.24xlarge",
                   help="SageMaker instance type (default: ml.p4d.24xlarge, 8 x A100 40 GB)")
    p.add_argument("--instance-count", type=_positive_int, default=1, help="instances (nodes)")
    p.add_argument("--smddp", action="store_true",
                   help="use SageMaker's data-parallel library (needs "
                        f"`pip install \"sagemaker<3\"`; {', '.join(SMDDP_INSTANCE_TYPES)})")
    p.add_argument("--role", help="IAM role ARN the job runs as (required unless --dry-run)")
    p.add_argument("--image-uri", help="training image; best an image with kd installed (the "
                   "repository's Dockerfile, pushed to ECR)")
    p.add_argument("--framework-version",
                   help="without --image-uri: PyTorch DLC version (default path: "
                        f"{', '.join(DLC_PY_VERSIONS)}; default {DEFAULT_FRAMEWORK_VERSION}) or, "
                        f"with --smddp, {', '.join(SMDDP_IMAGES)}")
    p.add_argument("--region", default=os.environ.get("AWS_REGION")
                   or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
                   help="AWS region (default: $AWS_REGION, $AWS_DEFAULT_REGION, else us-east-1)")
    p.add_argument("--source-dir", default=str(REPO_ROOT),
                   help="code uploaded to the job; must contain launch/sagemaker.py "
                        "(default: this repository)")
    p.add_argument("--data", metavar="S3URI",
                   help="the `train` channel (same as --channel train=S3URI): a prefix with train/ "
                        "and val/ class folders; kd gets data.root=/opt/ml/input/data/train")
    p.add_argument("--channel", action="append", default=[], metavar="NAME=S3URI",
                   help="an input channel, mounted at /opt/ml/input/data/NAME (repeatable)")
    p.add_argument("--input-mode", choices=("File", "FastFile"), default="File",
                   help="File: copy the channels to the instance before training; FastFile: "
                        "stream them from S3 on read (default: File)")
    p.add_argument("--checkpoint-s3", metavar="S3URI",
                   help="checkpoint_s3_uri: /opt/ml/checkpoints (kd's output_dir) is synced there "
                        "and restored on a restart, so the run resumes (checkpoint.resume=auto)")
    p.add_argument("--output-s3", metavar="S3URI",
                   help="where SageMaker writes model.tar.gz (default: the SDK's bucket)")
    p.add_argument("--spot", action="store_true",
                   help="managed spot training (needs --checkpoint-s3)")
    p.add_argument("--max-run", type=_positive_int, default=24 * 3600, metavar="SECONDS",
                   help="MaxRuntimeInSeconds (default 86400)")
    p.add_argument("--max-wait", type=_positive_int, metavar="SECONDS",
                   help="with --spot: MaxWaitTimeInSeconds, >= --max-run (default 2 x --max-run)")
    p.add_argument("--volume-size", type=_positive_int, default=200, metavar="GB",
                   help="VolumeSizeInGB per instance (default 200)")
    p.add_argument("--nproc-per-node", type=_positive_int,
                   help="default path: ranks per instance (default: every GPU)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra container environment variable (repeatable), e.g. NCCL_DEBUG=INFO")
    p.add_argument("--job-name", default="kd",
                   help="job name prefix; a UTC timestamp is appended (default: kd)")
    p.add_argument("--wait", action="store_true", help="wait for the job and stream its logs")
    p.add_argument("--dry-run", action="store_true",
                   help="print the job request as JSON; no SDK, credentials or network needed")
    return p


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Launcher options before ``--``; ``kd train`` arguments after it (as ``args.kd``)."""
    argv = list(argv)
    if "--" in argv:
        cut = argv.index("--")
        argv, kd = argv[:cut], argv[cut + 1:]
    else:
        kd = []
    args = build_parser().parse_args(argv)
    args.kd = kd
    return args


# --- the job request ------------------------------------------------------------------------

def _s3(uri: str, what: str) -> str:
    if not _S3.match(uri):
        raise LaunchError(f"{what}: {uri!r} is not an S3 URI (s3://bucket/prefix)")
    return uri


def parse_channels(args: argparse.Namespace) -> dict[str, str]:
    """``--data`` and ``--channel NAME=S3URI`` as {name: uri}, in order, checked."""
    items = ([f"train={args.data}"] if args.data else []) + list(args.channel)
    channels: dict[str, str] = {}
    for item in items:
        name, eq, uri = item.partition("=")
        if not eq or not name or not uri:
            raise LaunchError(f"--channel {item!r}: expected NAME=S3URI, e.g. train=s3://bucket/data/")
        if not _CHANNEL.match(name):
            raise LaunchError(f"--channel {item!r}: a channel name has 1-64 letters, digits, "
                              f"'.', '-' or '_'")
        if name in channels:
            raise LaunchError(f"channel {name!r} given twice (--data is the 'train' channel)")
        if not args.smddp and name in V3_RESERVED_CHANNELS:
            raise LaunchError(f"channel name {name!r} is reserved by the SageMaker SDK; "
                              f"pick another")
        channels[name] = _s3(uri, f"--channel {name}")
    return channels


def parse_env(pairs: Sequence[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in pairs:
        key, eq, value = item.partition("=")
        if not eq or not _ENV_KEY.match(key):
            raise LaunchError(f"--env {item!r}: expected KEY=VALUE with KEY a variable name")
        env[key] = value
    return env


def kd_train_args(passthrough: Sequence[str], launcher_overrides: Sequence[str]) -> list[str]:
    """``kd train`` arguments: the user's preset first, then the launcher's overrides, then the
    user's (later overrides win, so the user can still change what the launcher set)."""
    config: str | None = None
    overrides: list[str] = []
    items = list(passthrough)
    i = 0
    while i < len(items):
        item = items[i]
        if item in ("-c", "--config"):
            if i + 1 >= len(items):
                raise LaunchError(f"kd argument {item} needs a preset path")
            config, i = items[i + 1], i + 2
            continue
        if item.startswith("--config="):
            config = item.partition("=")[2]
        elif item.startswith("-"):
            raise LaunchError(f"kd argument {item!r}: `kd train` takes -c PRESET and key=value "
                              f"overrides only")
        elif "=" not in item or item.startswith("="):
            raise LaunchError(f"kd argument {item!r} is not of the form key=value "
                              f"(e.g. train.epochs=3)")
        else:
            overrides.append(item)
        i += 1
    return (["-c", config] if config else []) + list(launcher_overrides) + overrides


def job_name(prefix: str, now: _dt.datetime) -> str:
    name = f"{prefix}-{now:%Y%m%d-%H%M%S}"
    if not _NAME.match(prefix) or len(name) > 63:
        raise LaunchError(f"--job-name {prefix!r}: letters, digits and '-' only, starting with a "
                          f"letter or digit, at most 47 characters")
    return name


def _image(args: argparse.Namespace) -> str:
    if args.image_uri:
        if args.framework_version:
            raise LaunchError("give --image-uri or --framework-version, not both")
        return str(args.image_uri)
    if args.smddp:
        version = args.framework_version or DEFAULT_SMDDP_FRAMEWORK_VERSION
        if version not in SMDDP_IMAGES:
            raise LaunchError(
                f"--framework-version {version} with --smddp: kd needs PyTorch >= 2.4 and SMDDP "
                f"ships with it in PyTorch {', '.join(SMDDP_IMAGES)}; pass --image-uri for "
                f"another image that has smdistributed-dataparallel")
        return SMDDP_IMAGES[version].format(region=args.region)
    version = args.framework_version or DEFAULT_FRAMEWORK_VERSION
    if version not in DLC_PY_VERSIONS:
        raise LaunchError(f"--framework-version {version}: choose one of "
                          f"{', '.join(DLC_PY_VERSIONS)} (kd needs PyTorch >= 2.4), or --image-uri")
    return (f"{DLC_ACCOUNT}.dkr.ecr.{args.region}.amazonaws.com/pytorch-training:"
            f"{version}-gpu-{DLC_PY_VERSIONS[version]}")


def _environment(args: argparse.Namespace) -> dict[str, str]:
    env = {"PYTHONUNBUFFERED": "1"}
    if args.instance_type in EFA_INSTANCE_TYPES:
        env["FI_PROVIDER"] = "efa"
    if args.instance_type in EFA_RDMA_INSTANCE_TYPES:
        env["FI_EFA_USE_DEVICE_RDMA"] = "1"
    env.update(parse_env(args.env))
    return env


def build_job_request(args: argparse.Namespace, now: _dt.datetime | None = None) -> dict[str, Any]:
    """The CreateTrainingJob-shaped request for ``args`` (from :func:`parse_args`), plus a ``kd``
    block with the distribution mode and the command each node runs. Pure: no SDK, no AWS.

    Raises:
        LaunchError: an invalid combination of options (exit code 2 on the command line).
    """
    now = now or _dt.datetime.now(_dt.timezone.utc)
    if not _INSTANCE.match(args.instance_type):
        raise LaunchError(f"--instance-type {args.instance_type!r}: expected e.g. ml.p4d.24xlarge")
    if args.smddp:
        if args.instance_type not in SMDDP_INSTANCE_TYPES:
            raise LaunchError(f"--smddp needs --instance-type "
                              f"{' or '.join(SMDDP_INSTANCE_TYPES)} (SMDDP supports P4/P4de; on "
                              f"{args.instance_type} use the default torchrun path)")
        if args.nproc_per_node not in (None, SMDDP_PROCS_PER_NODE):
            raise LaunchError(f"--nproc-per-node: SMDDP always runs {SMDDP_PROCS_PER_NODE} ranks "
                              f"per instance; drop --smddp to choose")
    if args.role and not _ROLE.match(args.role):
        raise LaunchError(f"--role {args.role!r}: expected arn:aws:iam::ACCOUNT:role/NAME")
    source_dir = Path(args.source_dir).expanduser().resolve()
    if not (source_dir / ENTRY_SCRIPT).is_file():
        raise LaunchError(f"--source-dir {args.source_dir}: must contain {ENTRY_SCRIPT} "
                          f"(the job's entry point): pass the kd repository")
    channels = parse_channels(args)
    checkpoint_s3 = _s3(args.checkpoint_s3, "--checkpoint-s3") if args.checkpoint_s3 else None
    output_s3 = _s3(args.output_s3, "--output-s3") if args.output_s3 else None
    if args.max_run > MAX_RUNTIME_LIMIT_S:
        raise LaunchError(f"--max-run {args.max_run}: SageMaker allows at most "
                          f"{MAX_RUNTIME_LIMIT_S} s (28 days)")
    if args.spot:
        if not checkpoint_s3:
            raise LaunchError("--spot needs --checkpoint-s3, or an interrupted job starts over")
        max_wait = args.max_wait or 2 * args.max_run
        if max_wait < args.max_run:
            raise LaunchError(f"--max-wait {max_wait} must be >= --max-run {args.max_run}")
    elif args.max_wait is not None:
        raise LaunchError("--max-wait applies to managed spot training only: add --spot")
    else:
        max_wait = None

    launcher_overrides = []
    if "train" in channels:
        launcher_overrides.append(f"data.root={CHANNEL_ROOT}/train")
    if checkpoint_s3:
        launcher_overrides += [f"output_dir={CHECKPOINT_LOCAL_PATH}", "checkpoint.resume=auto"]
    else:
        launcher_overrides.append(f"output_dir={MODEL_DIR}")
    if args.smddp:
        launcher_overrides.append("dist.backend=smddp")
    kd_args = kd_train_args(args.kd, launcher_overrides)
    encoded = json.dumps(kd_args)
    image = _image(args)
    name = job_name(args.job_name, now)
    env = _environment(args)
    requirements = "requirements.txt" if (source_dir / "requirements.txt").is_file() else None

    count = args.instance_count
    if args.smddp:
        per_node: int | None = SMDDP_PROCS_PER_NODE
        hosts = ",".join(f"algo-{i + 1}:{per_node}" for i in range(count))
        node_command = ["mpirun", "--host", hosts, "-np", str(per_node * count), "...",
                        "smddprun", "python", "-m", "mpi4py", ENTRY_SCRIPT, CONTAINER_FLAG, encoded]
        distribution: dict[str, Any] = {"smdistributed": {"dataparallel": {"enabled": True}}}
        sdk = 'sagemaker<3: sagemaker.pytorch.PyTorch (pip install "sagemaker<3")'
        launcher = ("the training toolkit on algo-1 runs mpirun + smddprun, which starts every "
                    "rank on every instance over SSH; kd reads OMPI_COMM_WORLD_* variables")
    else:
        per_node = args.nproc_per_node or GPUS_PER_INSTANCE.get(args.instance_type)
        node_command = ["torchrun", f"--nnodes={count}",
                        f"--nproc_per_node={per_node or '<GPUs per instance>'}"]
        if count > 1:
            node_command += ["--master_addr=$SM_MASTER_ADDR", "--master_port=$SM_MASTER_PORT",
                             "--node_rank=$SM_CURRENT_HOST_RANK"]
        node_command += [ENTRY_SCRIPT, CONTAINER_FLAG, encoded]
        distribution = {"torchrun": {"process_count_per_node": args.nproc_per_node}}
        sdk = ('sagemaker>=3: sagemaker.train.ModelTrainer + sagemaker.train.distributed.Torchrun '
               '(pip install "kd[sagemaker]")')
        launcher = ("the SDK's torchrun driver runs node_command on every instance; kd reads "
                    "torchrun's RANK/WORLD_SIZE/LOCAL_RANK")

    stopping: dict[str, int] = {"MaxRuntimeInSeconds": args.max_run}
    if max_wait is not None:
        stopping["MaxWaitTimeInSeconds"] = max_wait
    request: dict[str, Any] = {
        "TrainingJobName": name,
        "RoleArn": args.role or "<--role arn:aws:iam::ACCOUNT:role/NAME>",
        "AlgorithmSpecification": {"TrainingImage": image, "TrainingInputMode": args.input_mode},
        "HyperParameters": {"kd_args": encoded},
        "InputDataConfig": [
            {"ChannelName": ch, "DataSource": {"S3DataSource": {
                "S3DataType": "S3Prefix", "S3Uri": uri,
                "S3DataDistributionType": "FullyReplicated"}}}
            for ch, uri in channels.items()],
        "OutputDataConfig": {"S3OutputPath": output_s3
                             or f"s3://sagemaker-{args.region}-<ACCOUNT>/ (the SDK's default)"},
        "ResourceConfig": {"InstanceType": args.instance_type, "InstanceCount": count,
                           "VolumeSizeInGB": args.volume_size},
        "StoppingCondition": stopping,
        "EnableManagedSpotTraining": bool(args.spot),
        "Environment": env,
    }
    if checkpoint_s3:
        request["CheckpointConfig"] = {"S3Uri": checkpoint_s3, "LocalPath": CHECKPOINT_LOCAL_PATH}
    request["kd"] = {
        "mode": "smddp" if args.smddp else "torchrun",
        "sdk": sdk,
        "distribution": distribution,
        "region": args.region,
        "source_dir": str(source_dir),
        "entry_script": ENTRY_SCRIPT,
        "requirements": requirements,
        "processes_per_node": per_node,
        "world_size": per_node * count if per_node else None,
        "launcher": launcher,
        "node_command": node_command,
        "rank_command": ["python", "-m", "kd.cli", "train", *kd_args],
        "kd_args": kd_args,
        "channels": {ch: f"{CHANNEL_ROOT}/{ch}" for ch in channels},
    }
    return request


# --- submission (imports the SDK) -----------------------------------------------------------

def _boto_session(region: str) -> Any:
    import boto3

    return boto3.Session(region_name=region)


def _submit_v3(args: argparse.Namespace, req: dict[str, Any]) -> str:
    try:
        from sagemaker.core.helper.session_helper import Session
        from sagemaker.train import ModelTrainer
        from sagemaker.train.distributed import Torchrun
        try:
            from sagemaker.core.training.configs import (
                CheckpointConfig,
                Compute,
                InputData,
                OutputDataConfig,
                SourceCode,
                StoppingCondition,
            )
        except ImportError:  # older v3 releases
            from sagemaker.train.configs import (  # type: ignore[no-redef]
                CheckpointConfig,
                Compute,
                InputData,
                OutputDataConfig,
                SourceCode,
                StoppingCondition,
            )
    except ImportError as e:
        raise LaunchError(f"the default path needs the SageMaker Python SDK v3 ({e}): "
                          f'pip install "kd[sagemaker]" (or pass --smddp for the SDK v2 path)'
                          ) from None
    kd, res, stop = req["kd"], req["ResourceConfig"], req["StoppingCondition"]
    compute = {"instance_type": res["InstanceType"], "instance_count": res["InstanceCount"],
               "volume_size_in_gb": res["VolumeSizeInGB"]}
    if req["EnableManagedSpotTraining"]:
        compute["enable_managed_spot_training"] = True
    stopping = {"max_runtime_in_seconds": stop["MaxRuntimeInSeconds"]}
    if "MaxWaitTimeInSeconds" in stop:
        stopping["max_wait_time_in_seconds"] = stop["MaxWaitTimeInSeconds"]
    extra: dict[str, Any] = {}
    if "CheckpointConfig" in req:
        ckpt = req["CheckpointConfig"]
        extra["checkpoint_config"] = CheckpointConfig(s3_uri=ckpt["S3Uri"],
                                                      local_path=ckpt["LocalPath"])
    if args.output_s3:
        extra["output_data_config"] = OutputDataConfig(s3_output_path=args.output_s3)
    trainer = ModelTrainer(
        sagemaker_session=Session(boto_session=_boto_session(args.region)),
        training_image=req["AlgorithmSpecification"]["TrainingImage"],
        training_input_mode=req["AlgorithmSpecification"]["TrainingInputMode"],
        role=args.role,
        base_job_name=args.job_name,  # the SDK appends its own timestamp
        source_code=SourceCode(source_dir=kd["source_dir"], entry_script=ENTRY_SCRIPT,
                               requirements=kd["requirements"], ignore_patterns=UPLOAD_IGNORE),
        distributed=Torchrun(process_count_per_node=args.nproc_per_node),
        compute=Compute(**compute),
        stopping_condition=StoppingCondition(**stopping),
        environment=req["Environment"],
        hyperparameters=req["HyperParameters"],
        **extra,
    )
    channels = [InputData(channel_name=c["ChannelName"],
                          data_source=c["DataSource"]["S3DataSource"]["S3Uri"])
                for c in req["InputDataConfig"]]
    trainer.train(input_data_config=channels or None, wait=args.wait, logs=args.wait)
    job = getattr(trainer, "_latest_training_job", None)
    return str(getattr(job, "training_job_name", None) or f"{args.job_name}-*")


def _submit_v2(args: argparse.Namespace, req: dict[str, Any]) -> str:
    try:
        import sagemaker
        from sagemaker.inputs import TrainingInput
        from sagemaker.pytorch import PyTorch
    except ImportError as e:
        raise LaunchError(f"--smddp needs the SageMaker Python SDK v2 ({e}; v3 removed "
                          f'sagemaker.pytorch): pip install "sagemaker<3"') from None
    kd, res, stop = req["kd"], req["ResourceConfig"], req["StoppingCondition"]
    extra: dict[str, Any] = {}
    if "MaxWaitTimeInSeconds" in stop:
        extra["max_wait"] = stop["MaxWaitTimeInSeconds"]
    if "CheckpointConfig" in req:
        extra["checkpoint_s3_uri"] = req["CheckpointConfig"]["S3Uri"]
        extra["checkpoint_local_path"] = req["CheckpointConfig"]["LocalPath"]
    if args.output_s3:
        extra["output_path"] = args.output_s3
    estimator = PyTorch(
        entry_point=ENTRY_SCRIPT,
        source_dir=kd["source_dir"],
        role=args.role,
        image_uri=req["AlgorithmSpecification"]["TrainingImage"],
        instance_type=res["InstanceType"],
        instance_count=res["InstanceCount"],
        volume_size=res["VolumeSizeInGB"],
        max_run=stop["MaxRuntimeInSeconds"],
        use_spot_instances=req["EnableManagedSpotTraining"],
        input_mode=req["AlgorithmSpecification"]["TrainingInputMode"],
        environment=req["Environment"],
        hyperparameters=req["HyperParameters"],
        distribution=kd["distribution"],
        sagemaker_session=sagemaker.Session(boto_session=_boto_session(args.region)),
        disable_profiler=True,
        debugger_hook_config=False,
        **extra,
    )
    inputs = {c["ChannelName"]: TrainingInput(c["DataSource"]["S3DataSource"]["S3Uri"])
              for c in req["InputDataConfig"]}
    estimator.fit(inputs=inputs or None, job_name=req["TrainingJobName"], wait=args.wait,
                  logs="All" if args.wait else "None")
    return str(req["TrainingJobName"])


def submit(args: argparse.Namespace) -> str:
    """Create the training job with the SageMaker SDK (v3, or v2 for --smddp); its name."""
    if not args.role:
        raise LaunchError("--role is required to submit (an IAM role ARN SageMaker can assume); "
                          "--dry-run works without one")
    req = build_job_request(args)
    return _submit_v2(args, req) if args.smddp else _submit_v3(args, req)


# --- inside the training container ----------------------------------------------------------

def _decode_kd_args(value: str) -> list[str]:
    """The ``kd_args`` hyperparameter: a JSON list of strings (SDKs may JSON-encode it again)."""
    decoded: Any = value
    for _ in range(3):
        if not isinstance(decoded, str):
            break
        try:
            decoded = json.loads(decoded)
        except ValueError:
            break
    if not isinstance(decoded, list) or not all(isinstance(a, str) for a in decoded):
        raise LaunchError(f"{CONTAINER_FLAG} must be a JSON list of strings, got {value!r}")
    return decoded


def _first_host(env: Mapping[str, str]) -> str:
    try:
        hosts = sorted(json.loads(env.get("SM_HOSTS", "[]")))
    except ValueError:
        hosts = []
    return hosts[0] if hosts else env.get("SM_MASTER_ADDR", "algo-1")


def container_main(argv: Sequence[str]) -> int:
    """Run ``kd train`` in this rank (started by torchrun or by mpirun + smddprun)."""
    argv = list(argv)
    i = argv.index(CONTAINER_FLAG)
    if i + 1 >= len(argv):
        raise LaunchError(f"{CONTAINER_FLAG} needs a value")
    kd_args = _decode_kd_args(argv[i + 1])
    env = os.environ
    if env.get("SM_NETWORK_INTERFACE_NAME"):
        env.setdefault("NCCL_SOCKET_IFNAME", env["SM_NETWORK_INTERFACE_NAME"])
    if "OMPI_COMM_WORLD_RANK" in env and "MASTER_ADDR" not in env:
        # mpirun forwards only some variables to the other instances; SageMaker's hosts are
        # algo-1..algo-N, and algo-1 runs the launcher.
        env["MASTER_ADDR"] = _first_host(env)
    sys.path.insert(0, str(REPO_ROOT))  # the uploaded source dir: kd as submitted
    try:
        from kd.cli import main
    except ImportError as e:
        print(f"launch/sagemaker.py: error: cannot import kd in the training container ({e}). "
              f"Use an image with kd's dependencies (see the Dockerfile) or put a "
              f"requirements.txt at the source-dir root.", file=sys.stderr)
        return 1
    return main(["train", *kd_args])


def _unshadow_sdk() -> None:
    """Run as ``python launch/sagemaker.py``, Python puts launch/ first on sys.path, where this
    file would shadow the ``sagemaker`` package for every later ``import sagemaker``."""
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if not p or Path(p).resolve() != here]
    if getattr(sys.modules.get("sagemaker"), "__file__", None) == __file__:
        del sys.modules["sagemaker"]


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _unshadow_sdk()
    try:
        if CONTAINER_FLAG in argv:
            return container_main(argv)
        args = parse_args(argv)
        if args.dry_run:
            print(json.dumps(build_job_request(args), indent=2))
            return 0
        name = submit(args)
    except LaunchError as e:
        print(f"launch/sagemaker.py: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # credentials, network, AWS refusals: one line, not a traceback
        if not type(e).__module__.startswith(("botocore", "boto3")):
            raise
        print(f"launch/sagemaker.py: error: AWS: {e}", file=sys.stderr)
        return 1
    print(f"submitted SageMaker training job {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
