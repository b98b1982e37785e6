"""Matrices of fine-tuning runs: runner.py (`skip2lora experiment`) and demo.py (`skip2lora demo`)."""
