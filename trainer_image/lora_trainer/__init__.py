"""lora_trainer: LoRA training for Stable Diffusion (diffusers) and causal LMs (peft)."""

__version__ = "0.1.0"
