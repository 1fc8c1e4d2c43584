# kd for GPU nodes: one node, or many over EFA (p4d/p5 on EC2 and SageMaker).
#   docker build -t kd .
#   docker run --rm --gpus all --entrypoint python kd launch/container_check.py
#   docker run --gpus all --ipc=host -v /data:/data -v "$PWD":/job kd \
#       train -c /job/my_job.yaml data.root=/data
#
# Base: the AWS Deep Learning Container for PyTorch training, EC2 flavour (public ECR, no login;
# tags: https://gallery.ecr.aws/deep-learning-containers/pytorch-training). It ships what the
# official pytorch/pytorch:*-runtime images lack (pytorch/pytorch#116696):
#   - EFA: libfabric with the EFA provider and the aws-ofi-nccl plugin, from the EFA installer,
#     on LD_LIBRARY_PATH (aws/deep-learning-containers pytorch/training/docker/2.8/py3/cu129/
#     Dockerfile.gpu and base/x86_64/gpu/cu129/ubuntu22.04/Dockerfile). Without the plugin NCCL
#     uses TCP sockets between nodes even with FI_PROVIDER=efa.
#   - a C/C++ compiler (build-essential, same Dockerfile): Triton compiles a launcher for its
#     kernels at run time, so train.compile=true needs one (triton/runtime/build.py).
#   - torch 2.8.0 and torchvision 0.23.0 built for CUDA 12.9 (download.pytorch.org/whl/cu129;
#     kd needs torch>=2.4, torchvision>=0.19), launch/sagemaker.py's default framework version.
# The -sagemaker flavour of the same tag adds SageMaker's training toolkit; this image does not
# need it (SDK v3 runs torchrun itself). Another base: --build-arg BASE_IMAGE=..., with torch and
# torchvision installed; a Debian/Ubuntu one without EFA (an NGC PyTorch image, for instance) also
# takes --build-arg EFA_INSTALLER_VERSION=1.43.2 below. The build ends with the container check,
# so an image without the plugin or a compiler does not build.
ARG BASE_IMAGE=public.ecr.aws/deep-learning-containers/pytorch-training:2.8.0-gpu-py312-cu129-ubuntu22.04-ec2
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Optional: EFA user space (libfabric, aws-ofi-nccl) and gcc/g++ for a base without them. Inside
# a container the installer must skip the kernel module, the ulimit configuration and the device
# check, which need the host (AWS EC2 user guide, "Install the EFA software in a container":
# https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/efa-installer-containers.html). The
# installer ships aws-ofi-nccl as libnccl-ofi ("Upgrade to libnccl-ofi ...", EFA release notes:
# https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/efa-changelog.html); ldconfig makes its
# libraries visible to dlopen(), hence to NCCL.
ARG EFA_INSTALLER_VERSION=
RUN if [ -n "${EFA_INSTALLER_VERSION}" ]; then \
        set -eux; \
        apt-get update; \
        apt-get install -y --no-install-recommends ca-certificates curl gcc g++; \
        mkdir /tmp/efa; cd /tmp/efa; \
        curl -fsSLO "https://efa-installer.amazonaws.com/aws-efa-installer-${EFA_INSTALLER_VERSION}.tar.gz"; \
        tar -xf "aws-efa-installer-${EFA_INSTALLER_VERSION}.tar.gz"; \
        cd aws-efa-installer; \
        ./efa_installer.sh -y --skip-kmod --skip-limit-conf --no-verify; \
        cd /; rm -rf /tmp/efa /var/lib/apt/lists/*; \
        ldconfig; \
    fi

WORKDIR /opt/kd
COPY setup.cfg pyproject.toml README.md ./
COPY kd ./kd
COPY configs ./configs
COPY launch ./launch

# Keep the image's torch: pin torch, torchvision, triton and the nvidia-*/cuda-* libraries at
# their installed versions (local tags such as +cu129 kept), after checking them against kd's
# requirements (an image whose torch is older than kd's torch>=2.4 stops here with one line).
# PIP_CONSTRAINT stays set, so later installs (a SageMaker requirements.txt, a derived image)
# cannot replace them either; unset it to change torch on purpose.
RUN python launch/pin_image_packages.py --output /opt/kd/constraints.txt \
        --setup-cfg setup.cfg --extras deepspeed,accelerate
ENV PIP_CONSTRAINT=/opt/kd/constraints.txt
RUN python -m pip install ".[deepspeed,accelerate]"

# No GPU while building: torch.compile runs on the CPU (C++), the plugin is checked on disk, and
# EFA devices are only seen on an EFA instance (SKIP here). Run the check again on a GPU node.
RUN python launch/container_check.py --device cpu

ENTRYPOINT ["kd"]
CMD ["train"]
