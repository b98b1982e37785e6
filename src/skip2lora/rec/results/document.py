"""docs/rec.md from run folders, pipeline folders and result JSON: protocol, metrics over seeds, anchors,
baselines, timings; for pipelines (`rec pipeline`) also distillation vs controls, the teacher and every phase's
cost (report_pipeline.py).

Reports only read what runs wrote. The published anchors below are other projects' numbers, labelled
as such in the output with their protocols; nothing here is a figure of ours typed by hand.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from ...errors import UserError
from ...outdir import RunDir, read_json_file
from ...paths import atomic_write_bytes, atomic_write_json
from ...report.stats import mean_std
from ...report.tables import Table, render_markdown
from .common import dataset_label, fmt, subset_line
from .pipeline import distillation_lines, is_pipeline_folder, load_pipeline, pipeline_sections
from .targets import pipeline_target_lines
from .verdict import teacher_time_lines

# Published numbers on classic ML-100k (943 users, 1,682 items), full ranking, leave-one-out.
ANCHORS = [
    {"name": "GRU4Rec, RecBole quick-start (published)", "split": "test", "hr@10": 0.1103, "ndcg@10": 0.0513,
     "protocol": "RecBole defaults: full ranking, no masking, max len 50, embedding 64"},
    {"name": "SASRec, UniRec (published)", "split": "validation", "hr@10": 0.129, "ndcg@10": 0.073,
     "protocol": "UniRec: full ranking, leave-one-out; validation split"},
]
TARGETS = {"hr@10": 0.11, "ndcg@10": 0.055, "train_s": 180.0, "test_eval_s": 1.0}
METHOD_ORDER = {"sasrec": 0, "sasrec+rd+ed": 1, "sasrec+rd+ed-shuffled": 2, "sasrec+ed": 3, "sasrec+rd": 4,
                "most-popular": 5, "random": 6}


def load_runs(paths: Sequence[Path]) -> tuple[list[dict], list[dict], list[dict]]:
    """(every run, the runs read from folders, the pipelines): run folders, pipeline folders, run.json files or
    rec-results JSON files (which may carry pipelines saved by --save)."""
    runs, from_folders, pipelines = [], [], []
    for path in paths:
        if is_pipeline_folder(path):
            pipeline, found = load_pipeline(path)
            pipelines.append(pipeline)
            from_folder = True
        elif path.is_dir():
            run = dict(RunDir(path).read_run_json(), name=path.name)
            found, from_folder = [run], True
        else:
            payload = read_json_file(path, "result file")
            found = payload.get("runs") if payload.get("kind") == "rec-results" else [payload]
            if not isinstance(found, list):
                raise UserError(f"{path}: 'runs' must be a list of run records")
            found = [dict(r, name=r.get("name") or path.stem) for r in found]
            pipelines.extend(payload.get("pipelines", []) if payload.get("kind") == "rec-results" else [])
            from_folder = False
        for run in found:
            if run.get("kind") != "rec" or run.get("status") != "completed":
                raise UserError(f"{path}: not a completed recommendation run (kind {run.get('kind')}, status "
                                f"{run.get('status')})")
        runs.extend(found)
        if from_folder:
            from_folders.extend(found)
    if not runs:
        raise UserError("no runs to report: pass run folders, pipeline folders or result JSON files")
    return runs, from_folders, pipelines


def group_key(run: dict) -> tuple:
    """Runs averaged together: one method on one dataset (and subset) under one protocol, from one pipeline (two
    pipelines' students are the same seeds, and their distilled students learnt from different teachers)."""
    p = run["summary"]["protocol"]
    return (run["method"], dataset_label(run["split"]), p["mask_history"], p["max_seq_len"], run.get("pipeline"))


def groups(runs: list[dict]) -> list[tuple[tuple, list[dict]]]:
    grouped: dict[tuple, list[dict]] = {}
    for run in runs:
        grouped.setdefault(group_key(run), []).append(run)
    return sorted(grouped.items(), key=lambda item: (METHOD_ORDER.get(item[0][0], 9), str(item[0][1:])))


def _setting(key: tuple) -> str:
    """What a row's runs share besides the method: data (and subset), masking, length, pipeline."""
    _, dataset, masked, max_len, pipeline = key
    source = f", pipeline {pipeline}" if pipeline else ""
    return f"{dataset}, {'masked' if masked else 'no masking'}, max len {max_len}{source}"


def setting_legend(grouped) -> dict[str, str]:
    """Each setting -> a short tag ([A], [B], ...) in order of first appearance: rows stay short."""
    tags: dict[str, str] = {}
    for key, _ in grouped:
        tags.setdefault(_setting(key), f"[{chr(ord('A') + len(tags))}]" if len(tags) < 26 else f"[{len(tags)}]")
    return tags


def metric_table(grouped, split: str, ks: list[int], anchors: bool) -> list[str]:
    head = ["ranker", "runs", "HR@10", "NDCG@10", "Recall@10"] + [f"HR@{k} / NDCG@{k}" for k in ks if k != 10]
    rows = []
    tags = setting_legend(grouped)
    for key, runs in grouped:
        values = lambda name: [r["summary"][split].get(name) for r in runs]  # noqa: E731
        label = f"{key[0]} {tags[_setting(key)]}"
        cells = [label, str(len(runs)), fmt(values("hr@10")), fmt(values("ndcg@10")), fmt(values("recall@10"))]
        cells += [f"{fmt(values(f'hr@{k}'))} / {fmt(values(f'ndcg@{k}'))}" for k in ks if k != 10]
        rows.append(cells + [fmt(values("loss"))])
    if anchors:
        for anchor in ANCHORS:
            if anchor["split"] == split:
                cells = [f"{anchor['name']}: {anchor['protocol']}", "–", f"{anchor['hr@10']:.4f}",
                         f"{anchor['ndcg@10']:.4f}", "–"] + ["–" for k in ks if k != 10]
                rows.append(cells + ["–"])
    legend = ["", "Settings: " + "; ".join(f"{tag} {setting}" for setting, tag in tags.items()) + "."]
    return render_markdown(Table(f"{split} metrics", head + ["CE loss"], rows), level=0).split("\n") + legend


def protocol_lines(student: dict) -> list[str]:
    p, s, cfg = student["summary"]["protocol"], student["split"], student["config"]
    model, train = cfg["model"], cfg["train"]
    return [
        f"- **Data**: {s['dataset']}: {s['users']} users, {s['items']} items, {s['interactions']} interactions, "
        f"sparsity {s['sparsity']:.4f}; {s['dropped_users']} users dropped for fewer than "
        f"{cfg['data']['min_interactions']} interactions. Sequence length median {s['seq_len_median']}, max "
        f"{s['seq_len_max']}.",
        *filter(None, [subset_line(s)]),
        f"- **Split**: {s['split']}; items ordered by {s['order']}. Histories are the last {p['max_seq_len']} items, "
        "left-padded; the test history includes the validation target.",
        f"- **Ranking**: {p['ranking']} (no sampled negatives; the padding item is never ranked); history masking: "
        f"**{'yes' if p['mask_history'] else 'no'}** (RecBole and DLLM2Rec do not mask); ties: {p['ties']}. "
        "Leave-one-out has one relevant item per user, so Recall@K equals HR@K. CE loss = cross-entropy of the "
        "target under softmax over all items, before masking.",
        f"- **Selection**: the epoch with the best {student['summary']['selection']} (patience {train['patience']} "
        "epochs); the test split is evaluated once, on that checkpoint.",
        f"- **Training samples**: every prefix of each user's training sequence (all items before the validation "
        f"target), trained at once as SASRec does: the sequence is cut from the end into windows of "
        f"{p['max_seq_len']} + 1 items overlapping by one, and every position predicts its next item "
        f"({student['summary']['train_windows']} windows, {student['summary']['train_targets']} targets).",
        f"- **Model**: SASRec, hidden {model['hidden']}, {model['blocks']} blocks, {model['heads']} heads, dropout "
        f"{model['dropout']}, learned positions, item embeddings shared with the output, loss `{model['loss']}` "
        f"({'full softmax over all items' if model['loss'] == 'ce' else 'one sampled negative'}); AdamW lr "
        f"{train['lr']}, weight decay {train['weight_decay']}, batch {train['batch_size']}, at most {train['epochs']} "
        f"epochs; {student['summary']['parameters']:,} parameters.",
        f"- **Machine**: {student['environment'].get('device_name')} ({student['environment'].get('device')}), "
        f"{student['environment'].get('threads')} threads, precision {student['environment'].get('precision')}, "
        f"torch {student['environment'].get('torch')}.",
    ]


def _cpu(timing: dict) -> str:
    return f"{timing['fit_cpu_s']:.1f}" if "fit_cpu_s" in timing else "–"


def run_table(runs: list[dict]) -> list[str]:
    head = ["run", "seed", "best epoch / run", "stopped", "val NDCG@10", "test HR@10", "test NDCG@10", "fit s",
            "fit CPU s", "training s", "s per epoch", "test eval s", "peak MB (fit)"]
    rows = []
    for run in runs:
        t, s = run["timing"], run["summary"]
        rows.append([run["name"], str(run["seed"]), f"{s['best_epoch']} / {s['epochs_run']}", s["stopped"],
                     f"{s['validation']['ndcg@10']:.4f}", f"{s['test']['hr@10']:.4f}", f"{s['test']['ndcg@10']:.4f}",
                     f"{t['fit_s']:.1f}", _cpu(t), f"{t['train_s']:.1f}", f"{t['epoch_time_s']['mean']:.2f}",
                     f"{t['test_eval_s']:.3f}", f"{t['memory']['fit']['peak_memory_mb']:.0f}"])
    return render_markdown(Table("student runs", head, rows, text_columns=4), level=0).split("\n")


def timing_table(runs: list[dict]) -> list[str]:
    col = lambda get, digits=3: fmt([get(r["timing"]) for r in runs], digits)  # noqa: E731
    rows = [
        ("data preparation (read, sort, split, windows)", col(lambda t: t["data_prep_s"]),
         col(lambda t: t["memory"]["data_prep"]["peak_memory_mb"], 0)),
        ("fit (training + per-epoch validation)", col(lambda t: t["fit_s"]),
         col(lambda t: t["memory"]["fit"]["peak_memory_mb"], 0)),
        ("training only (sum of epochs)", col(lambda t: t["train_s"]), ""),
        ("one training epoch (mean)", col(lambda t: t["epoch_time_s"]["mean"]), ""),
        ("one training epoch (fastest)", col(lambda t: t["epoch_time_s"]["min"]), ""),
        ("validation, all epochs", col(lambda t: t["validation_s"]), ""),
        ("one validation (all users)", col(lambda t: t["validation_time_s"]["mean"]), ""),
        (f"test evaluation ({runs[0]['timing']['test_eval_users']} users, full ranking)",
         col(lambda t: t["test_eval_s"]),
         col(lambda t: t["memory"]["test_eval"]["peak_memory_mb"], 0)),
    ]
    table = Table("student phases", ["phase", "seconds", "peak memory MB"], [list(row) for row in rows])
    return render_markdown(table, level=0).split("\n")


def timing_tables(students: list[dict]) -> list[str]:
    """One timing table per dataset and pipeline (a subset's runs are never averaged with the whole dataset's, nor
    two pipelines' runs of the same seeds with each other)."""
    by_data: dict[str, list[dict]] = {}
    for run in students:
        source = f", pipeline {run['pipeline']}" if run.get("pipeline") else ""
        by_data.setdefault(dataset_label(run["split"]) + source, []).append(run)
    if len(by_data) == 1:
        return timing_table(students)
    lines: list[str] = []
    for label, runs in by_data.items():
        lines += [f"### {label} ({len(runs)} runs)", "", *timing_table(runs), ""]
    return lines[:-1]


def _idle_estimate(students: list[dict]) -> str:
    """The slowest fit re-timed at its own fastest epoch: an estimate for cores nobody else uses, labelled so."""
    run = max(students, key=lambda r: r["timing"]["fit_s"])
    t = run["timing"]
    estimate = t["epoch_time_s"]["min"] * run["summary"]["epochs_run"] + t["validation_s"]
    return (f"; at its own fastest epoch ({t['epoch_time_s']['min']:.2f} s) its {run['summary']['epochs_run']} epochs "
            f"+ validation would take {estimate:.1f} s — an estimate, not a measurement")


def target_lines(all_students: list[dict]) -> list[str]:
    students = [r for r in all_students if not r["split"].get("subset")]
    if not students:
        return ["- not judged: every student ran on a subset of the data; the targets are for the whole dataset."]
    hr = mean_std([r["summary"]["test"]["hr@10"] for r in students]).mean
    ndcg = mean_std([r["summary"]["test"]["ndcg@10"] for r in students]).mean
    train = max(r["timing"]["train_s"] for r in students)
    fit = max(r["timing"]["fit_s"] for r in students)
    evaluation = max(r["timing"]["test_eval_s"] for r in students)
    verdict = lambda ok: "met" if ok else "**not met**"  # noqa: E731
    return [
        f"- test HR@10 >= {TARGETS['hr@10']}: mean {hr:.4f}, {verdict(hr >= TARGETS['hr@10'])}",
        f"- test NDCG@10 >= {TARGETS['ndcg@10']}: mean {ndcg:.4f}, {verdict(ndcg >= TARGETS['ndcg@10'])}",
        f"- training under {TARGETS['train_s']:.0f} s per run: slowest run {train:.1f} s of training "
        f"({fit:.1f} s with per-epoch validation{_idle_estimate(students)}), {verdict(fit < TARGETS['train_s'])}",
        f"- full-ranking evaluation of all users under {TARGETS['test_eval_s']:.0f} s: slowest {evaluation:.3f} s, "
        f"{verdict(evaluation < TARGETS['test_eval_s'])}",
    ]


def render(runs: list[dict], command: str, regenerate: Optional[str], pipelines: Sequence[dict] = (),
           project_targets: bool = False) -> str:
    students = [r for r in runs if r["method"] == "sasrec"]
    if not students:
        raise UserError("no SASRec student run among the inputs: pass the run folders of `skip2lora rec student`")
    first = students[0]
    ks = first["summary"]["protocol"]["ks"]
    grouped = groups(runs)
    names = {"ilora": "iLoRA", "skip2lora": "Skip2-LoRA"}
    teacher_names = sorted({names.get(m, m) for m in (p["settings"]["teacher"].get("method", "ilora") for p in pipelines)})
    teachers = " and ".join(teacher_names) + (" teachers" if len(teacher_names) > 1 else " teacher")
    title = (f"the SASRec student, the {teachers} and distillation on {dataset_label(first['split'])}"
             if pipelines else f"the SASRec student on {first['split']['dataset']}")
    records = f" and {len(pipelines)} pipeline record{'s' if len(pipelines) > 1 else ''}" if pipelines else ""
    out = [f"# Sequential recommendation: {title}", "",
           f"Generated by `{command}` from {len(runs)} run records{records}; do not edit by hand."]
    if regenerate:
        out.append(f"Regenerate from the saved records with `{regenerate}`.")
    verdict = [line.replace("- ", f"- {p['name']}: ", 1) if len(pipelines) > 1 else line
               for p in pipelines for line in distillation_lines(p, runs)] + teacher_time_lines(list(pipelines))
    if verdict:  # the answer first; the tables below are its evidence
        out += ["", "## Verdict", "Does the teacher help the student? Test NDCG@10, mean over seeds, judged against "
                "the seed-to-seed spread, and paired over test users with a 95% bootstrap interval (details in the "
                "distillation sections below).", "", *verdict]
    out += ["", "## Protocol", *protocol_lines(first), "",
            "## Test metrics (mean ± sample std over runs)",
            "Published anchors are other projects' numbers, shown with their protocols; they were not run here.",
            "", *metric_table(grouped, "test", ks, anchors=True), "",
            "## Validation metrics (the selection split)", "",
            *metric_table(grouped, "validation", ks, anchors=True), "",
            *(["## Targets (this project's own)", *target_lines(students), *pipeline_target_lines(pipelines, runs), ""]
              if project_targets else []),
            "## Phase timings of the student (mean ± sample std over runs)",
            f"Peak memory: {first['timing']['memory']['measure']}.", "", *timing_tables(students), "",
            "## Student runs",
            "Wall-clock times depend on what else the machine ran (its cores are shared): compare an epoch's min and "
            "mean in run.json (`timing.epoch_time_s`); fit CPU s is this process's CPU time, which also grows when "
            "threads wait for busy cores. Epoch counts and metrics do not depend on load (no wall-clock limit unless "
            "`stopped` says time_limit).", "", *run_table(students), ""]
    for pipeline in pipelines:
        out += pipeline_sections(pipeline, runs, titled=len(pipelines) > 1)
    return "\n".join(out)


def write_report(paths: Sequence[Path], out: Path, save: Optional[Path], command: str,
                 project_targets: bool = False) -> Path:
    runs, from_folders, pipelines = load_runs(paths)
    regenerate = None
    if save is not None:
        if not from_folders:
            raise UserError("--save copies the runs read from run folders, but every input was a JSON file")
        saved = [p for p in pipelines if p["name"] in {r.get("pipeline") for r in from_folders}]
        atomic_write_json(Path(save), {"kind": "rec-results", "generated_by": command, "runs": from_folders,
                                       **({"pipelines": saved} if saved else {})})
        others = [str(p) for p in paths if not p.is_dir()]
        regenerate = " ".join(["skip2lora rec report", str(save), *others, "--out", str(out)])
    atomic_write_bytes(Path(out), render(runs, command, regenerate, pipelines, project_targets).encode())
    return Path(out)


def compare_students(folders: list[Path], out_dir: Optional[Path], command: str) -> Path:
    """`skip2lora compare` on student run folders (registered as the "rec" run report): report.md in out_dir,
    default the runs' common parent."""
    import os

    out = Path(out_dir or Path(os.path.commonpath([str(f.parent) for f in folders]))) / "report.md"
    return write_report(folders, out, None, command)
