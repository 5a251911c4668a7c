"""lora-merge: LoRAs into base models (SD and LLMs), and LoRA format conversion."""
