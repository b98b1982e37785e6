"""Studies built on the skip2lora core: reproductions and measurements that write JSON and docs.

`paper` reproduces the Skip2-LoRA paper's setting (small fully-connected networks fine-tuned
under domain shift, with an edge-board thread budget).
"""
