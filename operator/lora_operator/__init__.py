"""lora_operator: the kopf operator that runs LoRATrainingJob resources."""

__version__ = "0.1.0"
