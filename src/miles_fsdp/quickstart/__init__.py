"""Building blocks of `miles-fsdp quickstart`: a synthetic addition task, a character
tokenizer, a tiny Qwen3 model made from scratch, and the measured presets that tie them."""
