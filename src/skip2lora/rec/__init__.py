"""Sequential recommendation: MovieLens data, the SASRec student, full-ranking metrics, training, reports.

The later teacher (MoE-LoRA LLM) and distillation build on `sasrec.SASRec`'s contract
(`forward(seq) -> [B, d]`, `full_sort_scores(seq) -> [B, n_items + 1]`) and on `data.RecDataset`'s
stable sample ids (`u{user}:{position}`) and item titles.
"""
