"""Datasets: image folders with captions, JSONL text, and the resumable sampler."""
