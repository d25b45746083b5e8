"""Ovis2: AIMv2-style visual tokenizer, visual embedding table and Qwen2 decoder (config, processing, modeling)."""
