"""Skip2-LoRA: method, adapters, frozen trunk, Skip-Cache and the chunked frozen-head loss."""
