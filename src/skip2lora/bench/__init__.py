"""`skip2lora benchmark`: suite (YAML), batches, worker processes, measurements, console output."""
