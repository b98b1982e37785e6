"""The `skip2lora rec ...` commands: typed functions that cli.py's command table runs.

A command whose one parameter is a config dataclass (student, distill, pipeline, speed) takes that class's
fields as its options, each documented by its attribute docstring; the others take their signature's
arguments, documented under Args. Every command accepts `--config FILE.yaml` (or the file first). Bad input
raises UserError; the command table prints its one line and exits 2.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

from ..errors import UserError
from ..paths import atomic_write_json
from .pipeline.config import RecPipelineConfig
from .speed.config import RecSpeedConfig
from .student.config import RecDataConfig, RecDistilledStudentConfig, RecEvalConfig, RecStudentConfig


def command_line(command: str) -> str:
    """How this command was called, for the `generated_by` of what it writes."""
    return shlex.join(["skip2lora", "rec", command, *sys.argv[3:]]) if sys.argv[1:3] == ["rec", command] else \
        f"skip2lora rec {command}"


def student(cfg: RecStudentConfig) -> int:
    """Train the SASRec student (leave-one-out split, full ranking, selection on validation NDCG@K)."""
    from .student.training import run_student

    run_student(cfg)
    return 0


def distill(cfg: RecDistilledStudentConfig) -> int:
    """Train the SASRec student distilled from saved teacher outputs (DLLM2Rec ranking and/or embedding
    distillation): --distill.teacher_outputs DIR."""
    from .student.training import run_student

    run_student(cfg)
    return 0


def evaluate(checkpoint: Path, split: str = "test", mask_history: Optional[bool] = None,
             data_path: Optional[Path] = None, device: str = "auto", threads: int = 0,
             out: Optional[Path] = None) -> int:
    """Full-ranking metrics of a trained student on its own split.

    Args:
        checkpoint: OUT/best of a `rec student` (or `rec distill`) run.
        split: test or validation.
        mask_history: Score the user's earlier items -inf (default: as in training).
        data_path: Where the raw files are now, when they moved since training.
        device: auto, cpu or cuda.
        threads: CPU threads for torch (0 = every core this process may use).
        out: Also write the metrics to this JSON file.
    """
    import torch

    from ..env import resolve_device, synchronize
    from .student.saved import check_student_items, load_student
    from .student.data import load_dataset
    from .student.metrics import evaluate_ranking
    from .student.training import check_cutoffs, set_threads

    if split not in ("test", "validation"):
        raise UserError(f"--split must be test or validation, got '{split}'")
    set_threads(threads)
    torch_device = resolve_device(device)
    loaded = load_student(checkpoint)
    if data_path is not None:
        loaded.data.path = Path(data_path)
    eval_cfg = loaded.eval if mask_history is None else replace(loaded.eval, mask_history=mask_history)
    dataset = load_dataset(loaded.data)
    check_student_items(loaded, dataset, checkpoint)
    check_cutoffs(eval_cfg.ks, dataset.n_items)
    model = loaded.model.to(torch_device)
    started = time.perf_counter()
    with torch.no_grad():
        result = evaluate_ranking(lambda inputs, a, b: model.full_sort_scores(inputs), dataset.split(split),
                                  eval_cfg.ks, eval_cfg.mask_history, eval_cfg.batch_size, torch_device)
    synchronize(torch_device)
    result["eval_s"] = time.perf_counter() - started
    result.update(split=split, checkpoint=str(checkpoint), mask_history=eval_cfg.mask_history)
    print(json.dumps(result, indent=2))
    if out is not None:
        atomic_write_json(Path(out), result)
    return 0


def baselines(out: Path, data: RecDataConfig = RecDataConfig(), eval: RecEvalConfig = RecEvalConfig(),
              seeds: list[int] = [1, 2, 3]) -> int:
    """Random and most-popular rankers through the students' evaluation.

    Args:
        out: Result JSON to write (e.g. docs/rec/baselines.json).
        data: Dataset and split.
        eval: Metrics and ranking protocol.
        seeds: Seeds of the random ranker.
    """
    from .student.baselines import run_baseline
    from .student.data import format_stats, load_dataset
    from .student.training import check_cutoffs

    if not seeds:
        raise UserError("--seeds must name at least one seed")
    dataset = load_dataset(data)
    check_cutoffs(eval.ks, dataset.n_items)
    print(format_stats(dataset.stats))
    runs = [run_baseline("random", dataset, data, eval, seed) for seed in seeds]
    runs.append(run_baseline("most-popular", dataset, data, eval, seeds[0]))
    for run in runs:
        test = run["summary"]["test"]
        print(f"{run['method']:>12} seed {run['seed']}: test hr@{eval.k} {test[f'hr@{eval.k}']:.4f} "
              f"ndcg@{eval.k} {test[f'ndcg@{eval.k}']:.4f}")
    atomic_write_json(Path(out), {"kind": "rec-results", "generated_by": command_line("baselines"), "runs": runs})
    print(f"wrote {out}")
    return 0


def stats(data: RecDataConfig = RecDataConfig(), out: Optional[Path] = None) -> int:
    """Print (and save) the leave-one-out split statistics of a dataset.

    Args:
        data: Dataset and split.
        out: Also write the statistics to this JSON file.
    """
    from .student.data import format_stats, load_dataset

    dataset = load_dataset(data)
    print(format_stats(dataset.stats))
    if out is not None:
        atomic_write_json(Path(out), dataset.stats)
    return 0


def teacher_eval(checkpoint: Path, split: str = "validation",
                 max_users: Optional[int] = None, protocol_users: Optional[int] = None,
                 ks: list[int] = [1, 5, 10, 20], mask_history: bool = False, batch_size: int = 8,
                 device: str = "auto", threads: int = 0, out: Optional[Path] = None) -> int:
    """A saved iLoRA or Skip2-LoRA teacher: full-catalogue HR/NDCG@K of its scores from history-only prompts (which
    never show the answer), iLoRA's HR@1 among the candidates and valid ratio (greedy generation on candidate
    prompts; a candidate-trained teacher only), and their cost.

    Args:
        checkpoint: OUT/final (or OUT/best) of an ilora or skip2lora run on data.name rec-teacher(-history).
        split: validation or test.
        max_users: The first N users only (CPU-sized runs).
        protocol_users: Users for iLoRA's candidate protocol (default: max_users; 0 skips it; a history-only
                teacher has none).
        ks: Cut-offs of the catalogue metrics (1 to the catalogue size).
        mask_history: Score the user's earlier items -inf.
        batch_size: Prompts per forward / generate call.
        device: auto, cpu or cuda.
        threads: CPU threads for torch (0 = every core this process may use).
        out: Also write the result to this JSON file.
    """
    from ..env import resolve_device
    from .student.training import set_threads
    from .teacher.evaluate import evaluate_teacher

    set_threads(threads)
    result = evaluate_teacher(checkpoint, split, ks, mask_history, max_users, protocol_users, batch_size,
                              resolve_device(device))
    result["generated_by"] = command_line("teacher-eval")
    print(json.dumps(result, indent=2))
    if out is not None:
        atomic_write_json(Path(out), result)
    return 0


def pipeline(cfg: RecPipelineConfig) -> int:
    """Student -> iLoRA (or Skip2-LoRA) teacher -> teacher evaluation -> teacher outputs -> distilled students
    and controls over the seeds, into one resumable folder with every phase timed (OUT/pipeline.json)."""
    from .pipeline.run import run_pipeline

    record = run_pipeline(cfg, command_line("pipeline"))
    print(f"pipeline {record['status']}: {cfg.out_dir / 'pipeline.json'}")
    return 0


def speed(cfg: RecSpeedConfig) -> int:
    """The teacher's speed knobs, each against its baseline in one run on the same data (fp32/bf16, inference
    batch, KV cache, loader workers, torch.compile, QLoRA, accumulation, iLoRA vs Skip2-LoRA): warm-up steps
    untimed, timed steps as mean ± std, each measurement in its own process (OUT/speed.json)."""
    from .speed.run import SPEED_JSON, run_speed
    from .speed.table import render_section

    record = run_speed(cfg, command_line("speed"))
    print(render_section(record))
    print(f"wrote {cfg.out_dir / SPEED_JSON}")
    return 0


def report(inputs: list[str], out: Path = Path("docs/rec.md"), save: Optional[Path] = None,
           project_targets: bool = False) -> int:
    """Render docs/rec.md from run folders, pipeline folders and rec result JSON files.

    Args:
        inputs: Run folders, run.json files, pipeline folders or result JSON files.
        out: Markdown file to write.
        save: Copy the runs read from run folders into this result JSON (so the document can be regenerated).
        project_targets: Also judge the runs against this project's own targets for its student (docs/rec.md);
            off for a report of your own runs.
    """
    from .results.document import write_report

    write_report([Path(p) for p in inputs], Path(out), save, command_line("report"), project_targets)
    print(f"wrote {out}")
    return 0


def speed_report(inputs: list[str], out: Path = Path("docs/rec_speed.md")) -> int:
    """Render the teacher speed table from `rec speed` results.

    Args:
        inputs: speed.json files or the folders of `rec speed` runs.
        out: Markdown file to write.
    """
    from .speed.table import write_speed_report

    write_speed_report([Path(p) for p in inputs], Path(out), command_line("speed-report"))
    print(f"wrote {out}")
    return 0
