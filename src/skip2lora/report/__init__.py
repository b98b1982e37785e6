"""Reports: everything here reads run folders and result JSON, and nothing here trains or measures.

tables.py (the one table type and its renderers), stats.py (mean ± std, ratios, the spread rule),
plots.py (figure helpers), runs.py (run folders for compare), settings.py (which runs pool as seeds, which
rows a claim may join), compare.py + compare_report.py + compare_verdict.py (`skip2lora compare`),
bench_report.py (`skip2lora benchmark-report`).
"""
