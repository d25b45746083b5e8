"""LLaVA-OneVision: SigLIP tower + GELU projector + Qwen2 decoder, with anyres image tiling."""
