"""How a base becomes trainable: full / LoRA / QLoRA set-up, adapter files, and the two LoRA
branches side by side (fused for training, batched for serving)."""
