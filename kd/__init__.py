"""kd: knowledge distillation for vision transformers, from one CPU to many GPUs."""

__version__ = "0.1.0"
