"""Captioning images into metadata.csv: the lora-label command and the auto_label step of a run."""
