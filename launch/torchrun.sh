#!/usr/bin/env bash
# Multi-node kd training with torchrun and a c10d rendezvous. Run it once per node.
# `launch/torchrun.sh --help` prints the usage.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/torchrun.sh [launcher options] [--] [kd train arguments]

Starts NPROC_PER_NODE kd ranks on this node with torchrun and a c10d rendezvous at
MASTER_ADDR:MASTER_PORT. Start it once on every node with the same NNODES, MASTER_ADDR,
MASTER_PORT and RDZV_ID. Every other argument goes to `python -m kd.cli train`.

Launcher options (each also read from the environment variable in capitals):
  --nnodes N            NNODES          nodes in the job (default 1)
  --nproc-per-node N    NPROC_PER_NODE  ranks on this node (default: GPUs visible, else 1)
  --node-rank R         NODE_RANK       0 on the node that hosts the rendezvous (MASTER_ADDR);
                                        any other value elsewhere. c10d assigns the ranks.
  --master-addr HOST    MASTER_ADDR     the rendezvous host, reachable from every node
                                        (default 127.0.0.1 when NNODES=1; required otherwise)
  --master-port PORT    MASTER_PORT     the rendezvous port (default 29500)
  --rdzv-endpoint H:P   RDZV_ENDPOINT   overrides MASTER_ADDR:MASTER_PORT
  --rdzv-id ID          RDZV_ID         job id shared by all nodes (default SLURM_JOB_ID, else kd)
  --max-restarts K      MAX_RESTARTS    restarts of the whole worker group on a failure (default 0);
                                        each restart resumes from the newest checkpoint
                                        (checkpoint.resume=auto)
  PYTHON                                the interpreter (default python)
  -h, --help                            this text

Examples:
  # one node, every GPU
  launch/torchrun.sh -c my_job.yaml
  # two CPU ranks over gloo on this machine
  NNODES=1 NPROC_PER_NODE=2 MASTER_ADDR=127.0.0.1 launch/torchrun.sh -c configs/tiny.yaml \
      distill.loss=none teacher.checkpoint=null output_dir=/tmp/kd_tiny
  # two nodes, 8 GPUs each: run on both (NODE_RANK=0 on node-a, 1 on node-b)
  NNODES=2 NPROC_PER_NODE=8 NODE_RANK=0 MASTER_ADDR=node-a MASTER_PORT=29500 RDZV_ID=job42 \
      launch/torchrun.sh -c my_job.yaml
EOF
}

die() {
  echo "launch/torchrun.sh: error: $*" >&2
  exit 2
}

# Launcher options come first; the first argument that is not one of them starts kd's arguments.
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --nnodes|--nproc-per-node|--node-rank|--master-addr|--master-port|--rdzv-endpoint|--rdzv-id|--max-restarts)
      [[ $# -ge 2 ]] || die "$1 needs a value"
      case "$1" in
        --nnodes) NNODES=$2 ;;
        --nproc-per-node) NPROC_PER_NODE=$2 ;;
        --node-rank) NODE_RANK=$2 ;;
        --master-addr) MASTER_ADDR=$2 ;;
        --master-port) MASTER_PORT=$2 ;;
        --rdzv-endpoint) RDZV_ENDPOINT=$2 ;;
        --rdzv-id) RDZV_ID=$2 ;;
        --max-restarts) MAX_RESTARTS=$2 ;;
      esac
      shift 2 ;;
    --) shift; break ;;
    *) break ;;
  esac
done

# GPUs this node may use: CUDA_VISIBLE_DEVICES (set by Slurm --gpus-per-node, docker, ...), else
# what nvidia-smi lists, else none.
visible_gpus() {
  if [[ -n "${CUDA_VISIBLE_DEVICES+x}" ]]; then
    if [[ -z "$CUDA_VISIBLE_DEVICES" || "$CUDA_VISIBLE_DEVICES" == "-1" ]]; then
      echo 0
    else
      awk -F, '{print NF}' <<<"$CUDA_VISIBLE_DEVICES"
    fi
  elif command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
  else
    echo 0
  fi
}

NNODES=${NNODES:-1}
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
  NPROC_PER_NODE=$(visible_gpus)
  [[ "$NPROC_PER_NODE" -gt 0 ]] || NPROC_PER_NODE=1
fi
MASTER_PORT=${MASTER_PORT:-29500}
if [[ -z "${MASTER_ADDR:-}" ]]; then
  [[ "$NNODES" == "1" ]] || die "NNODES=$NNODES needs MASTER_ADDR (the host name of the node with NODE_RANK=0)"
  MASTER_ADDR=127.0.0.1
fi
RDZV_ENDPOINT=${RDZV_ENDPOINT:-$MASTER_ADDR:$MASTER_PORT}
RDZV_ID=${RDZV_ID:-${SLURM_JOB_ID:-kd}}
MAX_RESTARTS=${MAX_RESTARTS:-0}
PYTHON=${PYTHON:-python}
# On SIGTERM (spot reclaim, Slurm preemption) torchrun passes the signal to its workers, which
# save a checkpoint at the next step boundary and exit with code 75; torchrun kills workers that
# are still running after this many seconds (its own default: 30). SageMaker allows 120 s.
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-110}
# kd from this checkout even where it is not pip-installed.
repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH="$repo_root${PYTHONPATH:+:$PYTHONPATH}"

for pair in "NNODES=$NNODES" "NPROC_PER_NODE=$NPROC_PER_NODE" "MASTER_PORT=$MASTER_PORT" \
            "MAX_RESTARTS=$MAX_RESTARTS"; do
  [[ "${pair#*=}" =~ ^[0-9]+$ ]] || die "${pair%%=*} must be a whole number, got '${pair#*=}'"
done
[[ "$NNODES" -ge 1 && "$NPROC_PER_NODE" -ge 1 ]] || die "NNODES and NPROC_PER_NODE must be >= 1"

# c10d hosts its store on the rendezvous node. torchrun guesses which node that is by comparing
# MASTER_ADDR with the local host names; NODE_RANK, when given, says it outright (a guess can
# miss when MASTER_ADDR is an alias or a fully qualified name).
rdzv_conf=()
if [[ -n "${NODE_RANK:-}" ]]; then
  [[ "$NODE_RANK" =~ ^[0-9]+$ ]] || die "NODE_RANK must be a whole number, got '$NODE_RANK'"
  if [[ "$NODE_RANK" == "0" ]]; then
    rdzv_conf=(--rdzv-conf is_host=true)
  else
    rdzv_conf=(--rdzv-conf is_host=false)
  fi
fi

# The same path for one node and many: a c10d rendezvous, never --standalone.
cmd=("$PYTHON" -m torch.distributed.run
     --nnodes "$NNODES"
     --nproc-per-node "$NPROC_PER_NODE"
     --rdzv-backend c10d
     --rdzv-endpoint "$RDZV_ENDPOINT"
     --rdzv-id "$RDZV_ID"
     ${rdzv_conf[@]+"${rdzv_conf[@]}"}
     --max-restarts "$MAX_RESTARTS"
     -m kd.cli train "$@")

echo "launch/torchrun.sh: node ${NODE_RANK:-?} of $NNODES, $NPROC_PER_NODE ranks, rendezvous $RDZV_ENDPOINT (id $RDZV_ID)" >&2
exec "${cmd[@]}"
