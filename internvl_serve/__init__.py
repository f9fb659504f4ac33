"""InternVL-Chat-V1-1 serving package: model math, checkpoints, engine (Triton-free) and serving helpers."""
