"""Model math in plain PyTorch: InternViT (vision), the pixel-shuffle projector (mlp1), the LLaMA
language model (transformers, the reference path) and InternVLChatModel, which ties them together
under the checkpoint's key names."""
