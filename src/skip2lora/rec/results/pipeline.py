"""The pipeline sections of docs/rec.md: baseline vs distilled student vs controls over seeds (with the spread
rule), the teacher's own metrics, and every phase's time and peak memory. Reads only pipeline.json and the
run.json files of the pipeline's student phases."""

from __future__ import annotations

from pathlib import Path
from ...errors import UserError
from ...outdir import RunDir, read_json_file
from ...report.stats import SPREAD_RULE, beyond_spread, mean_std
from ...report.tables import Table, render_markdown
from ..pipeline.config import DISTILL_DIR, STUDENT_DIR, VARIANT_ROLES
from ..pipeline.state import FORMAT, PIPELINE_JSON
from .common import fmt
from .verdict import BOOTSTRAP_NOTE, bootstrap_table, verdict_lines


def is_pipeline_folder(path: Path) -> bool:
    return path.is_dir() and (path / PIPELINE_JSON).is_file()


def load_pipeline(folder: Path) -> tuple[dict, list[dict]]:
    """(pipeline.json named after its folder, the run.json of every student and distilled phase, each marked
    with the pipeline's name); an unfinished pipeline is refused in one line."""
    record = read_json_file(folder / PIPELINE_JSON, PIPELINE_JSON)
    if record.get("format") != FORMAT:
        raise UserError(f"{folder / PIPELINE_JSON} is not a recommendation pipeline record")
    if record.get("status") != "completed":
        done = sum(1 for p in record.get("phases", {}).values() if p.get("status") == "completed")
        raise UserError(f"the pipeline in {folder} is not finished ({done} of {len(record.get('plan', []))} phases): "
                        "rerun `skip2lora rec pipeline` with its config to finish it")
    name = folder.name
    runs = []
    for phase in record["plan"]:
        if phase.split("/")[0] in (STUDENT_DIR, DISTILL_DIR):
            runs.append(dict(RunDir(folder / phase).read_run_json(), name=f"{name}/{phase}", pipeline=name))
    return dict(record, name=name), runs


# -- distillation ----------------------------------------------------------------------------------
def _verdict(variant: list[float], baseline: list[float]) -> str:
    a, b = mean_std(variant), mean_std(baseline)
    judged = beyond_spread(a, b)
    if judged is None:
        return "not judged"
    return ("yes, higher" if a.mean > b.mean else "yes, lower") if judged else "no"


def distillation_table(pipeline: dict, runs: list[dict]) -> Table:
    """Baseline, distilled student and controls on the test split: mean ± std over seeds, the difference from
    the baseline, and whether it is beyond the seed-to-seed spread."""
    mine = [r for r in runs if r.get("pipeline") == pipeline["name"]]
    by_method: dict[str, list[dict]] = {}
    for run in mine:
        by_method.setdefault(run["method"], []).append(run)
    baseline = by_method.get("sasrec", [])
    test = lambda group, key: [r["summary"]["test"][key] for r in group]  # noqa: E731
    rows = []
    for method, role in [("sasrec", "baseline")] + [(f"sasrec+{v}", VARIANT_ROLES[v])
                                                     for v in pipeline["settings"]["variants"]]:
        group = by_method.get(method, [])
        if not group:
            continue
        delta = lambda key: (fmt([mean_std(test(group, key)).mean - mean_std(test(baseline, key)).mean])  # noqa: E731
                             if method != "sasrec" and baseline else "–")
        rows.append([method, role, str(len(group)), fmt(test(group, "hr@10")), fmt(test(group, "ndcg@10")),
                     delta("hr@10"), delta("ndcg@10"),
                     "–" if method == "sasrec" else _verdict(test(group, "ndcg@10"), test(baseline, "ndcg@10")),
                     fmt([r["summary"]["validation"]["ndcg@10"] for r in group])])
    headers = ["student", "role", "seeds", "test HR@10", "test NDCG@10", "Δ HR@10", "Δ NDCG@10",
               "NDCG@10 beyond the spread", "val NDCG@10 (selection)"]
    return Table("Distillation", headers, rows, text_columns=2)


def distillation_lines(pipeline: dict, runs: list[dict]) -> list[str]:
    """What the table says about the teacher, in sentences generated from the numbers."""
    mine = [r for r in runs if r.get("pipeline") == pipeline["name"]]
    ndcg = lambda method: [r["summary"]["test"]["ndcg@10"] for r in mine if r["method"] == method]  # noqa: E731
    lines = []
    pairs = [("sasrec+rd+ed", "sasrec", "the distilled student vs the baseline"),
             ("sasrec+rd+ed", "sasrec+rd+ed-shuffled", "the real teacher vs a teacher shuffled between users")]
    for variant, reference, what in pairs:
        if ndcg(variant) and ndcg(reference):
            a, b = mean_std(ndcg(variant)), mean_std(ndcg(reference))
            verdict = {None: "not judged (fewer than 2 seeds)", True: "beyond the seed spread",
                       False: "within the seed spread"}[beyond_spread(a, b)]
            lines.append(f"- {what}: test NDCG@10 {a.mean:.4f} vs {b.mean:.4f} ({a.mean - b.mean:+.4f}), {verdict}.")
    return lines + verdict_lines(pipeline, runs)


# -- the teacher -------------------------------------------------------------------------------------
def teacher_table(pipeline: dict) -> Table:
    """The teacher's catalogue HR/NDCG@10 on each split it was evaluated on (history-only prompts: leak-free;
    older runs scored candidate prompts, labelled so) and iLoRA's own protocol among the candidates."""
    phases, settings = pipeline["phases"], pipeline["settings"]["teacher"]
    result = phases["teacher-eval"]["result"]
    candidates = result.get("candidates") or {}
    by_split = result.get("catalogue_by_split") or {result["split"]: result["catalogue"]}
    get = lambda key: f"{candidates[key]:.4f}" if key in candidates else "–"  # noqa: E731
    rows = []
    for split, catalogue in by_split.items():
        prompts = "history only" if catalogue.get("prompts") else "candidates (lists the target)"
        protocol = split == result["split"]
        rows.append([f"{settings.get('method', 'ilora')} on {settings['model']}", split, prompts,
                     str(catalogue["users"]), f"{catalogue['hr@10']:.4f}", f"{catalogue['ndcg@10']:.4f}",
                     str(candidates.get("samples", "–")) if protocol else "–",
                     *(get(k) if protocol else "–" for k in ("hr@1", "hr@1_all", "valid_ratio", "grounded_hr@1"))])
    headers = ["teacher", "split", "scored prompts", "users", "HR@10", "NDCG@10", "users (iLoRA protocol)",
               "HR@1 of valid", "HR@1 of all", "valid ratio", "grounded HR@1"]
    return Table("Teacher", headers, rows, text_columns=3)


def teacher_adapters(settings: dict) -> str:
    """The teacher's trainable part in words, from its recorded finetune settings (ilora or skip2lora)."""
    method = settings.get("method", "ilora")
    if method == "skip2lora":
        skip = settings["skip2lora"]
        return (f"skip adapters from blocks {skip['block_indices']} into the output "
                f"head (rank {skip['r']}, alpha {skip['alpha']}, dropout {skip['dropout']}, output {skip['output']}), "
                f"Skip-Cache {skip['cache']}")
    ilora = settings["ilora"]
    return (f"{ilora['experts']} experts sharing rank {ilora['r']} (alpha "
            f"{ilora['alpha']}, dropout {ilora['dropout']})")


def teacher_lines(pipeline: dict) -> list[str]:
    t, settings = pipeline["phases"]["teacher"], pipeline["settings"]["teacher"]
    data = settings["data"]
    loss = lambda value: "–" if value is None else f"{value:.4f}"  # noqa: E731
    return [f"- Fine-tuned with `finetune --method {settings.get('method', 'ilora')}` on {t['model']}: "
            f"{teacher_adapters(settings)}, {t['steps']} steps of "
            f"{settings['train']['global_batch_size']} prompts ({t['samples_seen']} samples seen), precision "
            f"{t['precision']}; train loss {loss(t['first_train_loss'])} -> {loss(t['final_train_loss'])}, best "
            f"validation loss {loss(t['best_val_loss'])}. Training prompts: {data['history_items']} history titles, "
            + ("no candidates (history only)" if data.get("name") == "rec-teacher-history"
               else f"{data['candidates']} candidates") + f", at most {data['max_seq_length']} tokens, style "
            f"{data['prompt_style']}.",
            "- HR@10 / NDCG@10: the teacher's grounded scores over the whole catalogue (docs/rec_teacher.md), with the "
            "students' protocol, from the prompts the column names: history only never shows the target. iLoRA's "
            "protocol (candidate prompts, which list the target): HR@1 of valid is iLoRA's definition (correct / "
            "answers naming exactly one candidate), HR@1 of all divides by every prompt; grounded HR@1 is the best "
            "candidate by the catalogue scores."]


# -- phase timings -------------------------------------------------------------------------------------
def _phase_groups(pipeline: dict) -> list[tuple[str, list[dict]]]:
    """Phases in plan order, seeds of one kind together: (label, entries)."""
    groups: dict[str, list[dict]] = {}
    for phase in pipeline["plan"]:
        parts = phase.split("/")
        entry = pipeline["phases"][phase]
        if parts[0] == STUDENT_DIR:
            label = "student (SASRec baseline), per seed"
        elif parts[0] == DISTILL_DIR:
            label = f"distilled student {entry['method']}, per seed"
        else:
            rows = "newest positions" if entry.get("newest_positions") else "every training sample"
            label = {"teacher": "teacher fine-tuning", "teacher-eval": "teacher evaluation",
                     "teacher-outputs": f"teacher outputs ({rows})"}[parts[0]]
        groups.setdefault(label, []).append(entry)
    return list(groups.items())


def _unit(entries: list[dict]) -> tuple[str, str, str]:
    """(main part's seconds, the time per unit, test evaluation seconds) of one group of phases."""
    first = entries[0]
    col = lambda key, digits=3: fmt([e.get(key) for e in entries], digits)  # noqa: E731
    if "fit_s" in first:
        return (f"fit {col('fit_s')}", f"{col('epoch_s_mean')} s/epoch ({col('epochs_run', 1)} epochs)",
                col("test_eval_s"))
    if "steps" in first:
        return f"train {col('train_s', 1)}", f"{col('step_s_mean')} s/step ({first['steps']} steps)", "–"
    if "generation_s" in first:  # the record's key: the time of one prompt forward per sample, no generation
        return (f"scoring {col('generation_s', 1)}", f"{col('generation_s_per_sample')} s/sample, one prompt "
                f"forward each ({first['samples']} samples, batch {first['inference_batch_size']})", "–")
    return (f"catalogue ranking {col('catalogue_eval_s', 1)} ({first['users']} users)",
            f"{col('prompt_forward_s_per_sample')} s/sample forward, {col('generate_s_per_sample')} s/sample "
            "generation", "–")


def timing_table(pipeline: dict) -> Table:
    rows = []
    for label, entries in _phase_groups(pipeline):
        main, unit, test = _unit(entries)
        rows.append([label, str(len(entries)), fmt([e["seconds"] for e in entries], 2), main, unit, test,
                     fmt([e["peak_memory_mb"] for e in entries], 0)])
    total = sum(e["seconds"] for e in pipeline["phases"].values())
    rows.append(["all phases (sum)", str(len(pipeline["phases"])), f"{total:.1f}", "", "", "", ""])
    headers = ["phase", "runs", "wall s", "main part s", "per unit", "test evaluation s", "peak memory MB"]
    return Table("Phase timings", headers, rows, text_columns=1)


def timing_lines(pipeline: dict) -> list[str]:
    starts = sorted({entry.get("start", len(pipeline["starts"])) for entry in pipeline["phases"].values()})
    env = pipeline["starts"][starts[-1] - 1]["environment"]
    machine = (f"Machine: {env.get('device_name')} ({env.get('device')}), {env.get('threads')} threads, torch "
               f"{env.get('torch')}")
    if len(starts) > 1:
        machine += (f" (the machine of the last of the {len(starts)} starts that ran phases: the pipeline was "
                    "resumed; pipeline.json names each phase's start and each start's machine)")
    return [machine + ".",
            "Wall s is a phase's whole time in the pipeline process (loading included; imports done before the "
            "first phase); peak memory is the process's high-water mark reset at the phase start (VmHWM on CPU, "
            "the allocator's peak on CUDA), so on CPU it includes what earlier phases left in the process "
            "(pipeline.json records each phase's starting RSS)."]


def pipeline_sections(pipeline: dict, runs: list[dict], titled: bool) -> list[str]:
    """Markdown of one pipeline: distillation, teacher, timings."""
    suffix = f" ({pipeline['name']})" if titled else ""
    seeds = pipeline["settings"]["seeds"]
    return [f"## Distillation: baseline vs distilled student vs controls{suffix}",
            f"Test split; mean ± sample std over seeds {seeds}; Δ = the variant's mean minus the baseline's. "
            f"Spread rule: {SPREAD_RULE}.", "", render_markdown(distillation_table(pipeline, runs), level=0), "",
            BOOTSTRAP_NOTE, "", render_markdown(bootstrap_table(pipeline, runs), level=0), "",
            *distillation_lines(pipeline, runs), "",
            f"## The teacher's own metrics{suffix}", "", render_markdown(teacher_table(pipeline), level=0), "",
            *teacher_lines(pipeline), "",
            f"## Phase timings of the pipeline{suffix}", *timing_lines(pipeline), "",
            render_markdown(timing_table(pipeline), level=0), ""]
