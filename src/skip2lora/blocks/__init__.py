"""`skip2lora blocks`: which blocks Skip2-LoRA should tap, judged by cheap probes on cached features."""
