# kd on an official PyTorch CUDA runtime image (GPU nodes, SageMaker bring-your-own-container).
#   docker build -t kd .
#   docker run --gpus all --ipc=host -v /data:/data kd train -c configs/my.yaml data.root=/data
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/kd
COPY setup.cfg pyproject.toml README.md ./
COPY kd ./kd
COPY configs ./configs
COPY launch ./launch
RUN pip install ".[deepspeed,accelerate]"

ENTRYPOINT ["kd"]
CMD ["train"]
