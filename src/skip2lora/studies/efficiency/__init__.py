"""The LoRA efficiency study: LoRA configurations against full fine-tuning over data sizes, models and tasks,
with published claims checked against the measurements.

grid.py (the YAML and the runner spec) -> study.py (runs, through experiments.runner) -> results.py (run
folders -> records and cells) -> claims.py (verdicts) -> report.py and plots.py (JSON -> Markdown, PNG).
"""
