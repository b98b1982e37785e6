"""`skip2lora rec COMMAND`: student, distill, evaluate, baselines, stats, teacher-eval, pipeline, report,
speed, speed-report.

Every bad input raises UserError (one line); the main command table prints it and exits 2.
Until `rec` is wired there, `python -m skip2lora.rec.cli COMMAND ...` does the same.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

from ..errors import UserError

USAGE = """usage: skip2lora rec COMMAND [CONFIG.yaml] [--options]

commands:
  student    train the SASRec student (leave-one-out, full ranking, selection on validation NDCG@K)
  distill    the same student distilled from saved teacher outputs (DLLM2Rec): --distill.teacher_outputs DIR
  evaluate   full-ranking metrics of a trained student: --checkpoint OUT/best
  baselines  random and most-popular rankers through the same evaluation: --out FILE.json
  stats      print (and save with --out) the split statistics of a dataset
  teacher-eval  a saved iLoRA or Skip2-LoRA teacher: HR@1 among its candidates, valid ratio, catalogue HR/NDCG@K
  pipeline   student -> iLoRA (or Skip2-LoRA) teacher -> teacher evaluation -> teacher outputs -> distilled students and
             controls over the seeds, one resumable folder with every phase timed: CONFIG.yaml
  report     render docs/rec.md from run folders and result JSON: RUNS... --out docs/rec.md
  speed      the teacher's speed knobs, each against its baseline in one run (fp32/bf16, inference batch,
             KV cache, loader workers, torch.compile, QLoRA, accumulation, iLoRA vs Skip2-LoRA): CONFIG.yaml
  speed-report  render the speed table from speed.json files: JSON... --out docs/rec_speed.md

`skip2lora rec COMMAND --help` lists a command's options."""


def one_line(message: object) -> str:
    return re.sub(r"\s+", " ", str(message)).strip()


def _check_config_file(path: Path) -> None:
    import yaml

    if not path.is_file():
        raise UserError(f"config file {path} does not exist: check the path")
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UserError(f"config file {path} is malformed YAML{where}: {getattr(exc, 'problem', exc)}") from exc
    if loaded is not None and not isinstance(loaded, dict):
        raise UserError(f"config file {path} must hold a mapping of keys to values")


def parse(parser, argv: list[str], config_positional: bool = False):
    """jsonargparse with a positional CONFIG.yaml accepted first; parse errors become one UserError line."""
    from jsonargparse import ArgumentError

    argv = list(argv)
    if config_positional and argv and not argv[0].startswith("-") and re.search(r"\.(ya?ml|json)$", argv[0]):
        argv = ["--config", *argv]
    for position, token in enumerate(argv):
        flag, _, inline = token.partition("=")
        if flag == "--config":
            _check_config_file(Path(inline or (argv[position + 1] if position + 1 < len(argv) else "")))
    try:
        return parser.parse_args(argv)
    except ArgumentError as exc:
        raise UserError(f"{parser.prog}: {one_line(exc)}") from exc


def _parser(prog: str, description: str):
    from jsonargparse import ArgumentParser

    return ArgumentParser(prog=prog, exit_on_error=False, description=description)


def student_parser():
    from jsonargparse import ActionConfigFile

    from .student.config import RecStudentConfig

    parser = _parser("skip2lora rec student", "Train the SASRec student and evaluate it with full ranking.")
    parser.add_argument("--config", action=ActionConfigFile, help="YAML config (may also be given first, positionally)")
    parser.add_class_arguments(RecStudentConfig, nested_key=None)
    return parser


def student_config(values: dict, config_class=None):
    """Parsed values -> RecStudentConfig (or `config_class`, e.g. RecDistilledStudentConfig), sections built."""
    from .student.config import RecDataConfig, RecDistillConfig, RecEvalConfig, RecStudentConfig, RecTrainConfig, SASRecConfig

    values = dict(values)
    values.pop("config", None)
    sections = {"data": RecDataConfig, "model": SASRecConfig, "train": RecTrainConfig, "eval": RecEvalConfig,
                "distill": RecDistillConfig}
    for key, cls in sections.items():
        if key in values:
            values[key] = cls(**values[key])
    return (config_class or RecStudentConfig)(**values)


def cmd_student(argv: list[str]) -> int:
    from .student.training import run_student

    run_student(student_config(parse(student_parser(), argv, config_positional=True).as_dict()))
    return 0


def distill_parser():
    from jsonargparse import ActionConfigFile

    from .student.config import RecDistilledStudentConfig

    parser = _parser("skip2lora rec distill", "Train the SASRec student with DLLM2Rec-style distillation from "
                     "saved teacher outputs (ranking and/or embedding distillation), selected on validation.")
    parser.add_argument("--config", action=ActionConfigFile, help="YAML config (may also be given first, positionally)")
    parser.add_class_arguments(RecDistilledStudentConfig, nested_key=None)
    return parser


def cmd_distill(argv: list[str]) -> int:
    from .student.config import RecDistilledStudentConfig
    from .student.training import run_student

    values = parse(distill_parser(), argv, config_positional=True).as_dict()
    run_student(student_config(values, RecDistilledStudentConfig))
    return 0


def cmd_evaluate(argv: list[str]) -> int:
    import torch

    from ..env import resolve_device, synchronize
    from .student.checkpoint import check_checkpoint_items, load_checkpoint
    from .student.data import load_dataset
    from .student.metrics import evaluate_ranking
    from .student.training import check_cutoffs, set_threads

    parser = _parser("skip2lora rec evaluate", "Full-ranking metrics of a trained student on its own split.")
    parser.add_argument("--checkpoint", type=Path, required=True, help="OUT/best of a `rec student` run")
    parser.add_argument("--split", type=str, default="test", help="test or validation")
    parser.add_argument("--mask_history", type=Optional[bool], default=None, help="default: as in training")
    parser.add_argument("--data_path", type=Optional[Path], default=None, help="where the raw files are now")
    parser.add_argument("--device", type=str, default="auto", help="auto, cpu or cuda")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0 = every core)")
    parser.add_argument("--out", type=Optional[Path], default=None, help="also write the metrics to this JSON file")
    args = parse(parser, argv)
    if args.split not in ("test", "validation"):
        raise UserError(f"--split must be test or validation, got '{args.split}'")
    set_threads(args.threads)
    device = resolve_device(args.device)
    loaded = load_checkpoint(args.checkpoint)
    if args.data_path is not None:
        loaded.data.path = Path(args.data_path)
    eval_cfg = loaded.eval if args.mask_history is None else replace(loaded.eval, mask_history=args.mask_history)
    dataset = load_dataset(loaded.data)
    check_checkpoint_items(loaded, dataset, args.checkpoint)
    check_cutoffs(eval_cfg.ks, dataset.n_items)
    split = dataset.split(args.split)
    model = loaded.model.to(device)
    started = time.perf_counter()
    with torch.no_grad():
        result = evaluate_ranking(lambda inputs, a, b: model.full_sort_scores(inputs), split, eval_cfg.ks,
                                  eval_cfg.mask_history, eval_cfg.batch_size, device)
    synchronize(device)
    result["eval_s"] = time.perf_counter() - started
    result.update(split=args.split, checkpoint=str(args.checkpoint), mask_history=eval_cfg.mask_history)
    print(json.dumps(result, indent=2))
    if args.out is not None:
        from ..paths import atomic_write_json

        atomic_write_json(Path(args.out), result)
    return 0


def _data_eval_parser(prog: str, description: str):
    from .student.config import RecDataConfig, RecEvalConfig

    parser = _parser(prog, description)
    parser.add_class_arguments(RecDataConfig, nested_key="data")
    parser.add_class_arguments(RecEvalConfig, nested_key="eval")
    return parser


def cmd_baselines(argv: list[str]) -> int:
    from ..paths import atomic_write_json
    from .student.baselines import run_baseline
    from .student.config import RecDataConfig, RecEvalConfig
    from .student.data import format_stats, load_dataset
    from .student.training import check_cutoffs

    parser = _data_eval_parser("skip2lora rec baselines", "Random and most-popular rankers, same evaluation.")
    parser.add_argument("--seeds", type=list[int], default=[1, 2, 3], help="seeds of the random ranker")
    parser.add_argument("--out", type=Path, required=True, help="result JSON to write (e.g. docs/rec/baselines.json)")
    args = parse(parser, argv)
    data_cfg, eval_cfg = RecDataConfig(**args.data.as_dict()), RecEvalConfig(**args.eval.as_dict())
    if not args.seeds:
        raise UserError("--seeds must name at least one seed")
    dataset = load_dataset(data_cfg)
    check_cutoffs(eval_cfg.ks, dataset.n_items)
    print(format_stats(dataset.stats))
    runs = [run_baseline("random", dataset, data_cfg, eval_cfg, seed) for seed in args.seeds]
    runs.append(run_baseline("most-popular", dataset, data_cfg, eval_cfg, args.seeds[0]))
    for run in runs:
        test = run["summary"]["test"]
        print(f"{run['method']:>12} seed {run['seed']}: test hr@{eval_cfg.k} {test[f'hr@{eval_cfg.k}']:.4f} "
              f"ndcg@{eval_cfg.k} {test[f'ndcg@{eval_cfg.k}']:.4f}")
    atomic_write_json(Path(args.out), {"kind": "rec-results", "generated_by": command_line("baselines", argv),
                                       "runs": runs})
    print(f"wrote {args.out}")
    return 0


def cmd_stats(argv: list[str]) -> int:
    from ..paths import atomic_write_json
    from .student.config import RecDataConfig
    from .student.data import format_stats, load_dataset

    parser = _parser("skip2lora rec stats", "Print and save the leave-one-out split statistics.")
    parser.add_class_arguments(RecDataConfig, nested_key="data")
    parser.add_argument("--out", type=Optional[Path], default=None, help="also write them to this JSON file")
    args = parse(parser, argv)
    dataset = load_dataset(RecDataConfig(**args.data.as_dict()))
    print(format_stats(dataset.stats))
    if args.out is not None:
        atomic_write_json(Path(args.out), dataset.stats)
    return 0


def cmd_report(argv: list[str]) -> int:
    from .results.document import write_report

    parser = _parser("skip2lora rec report", "Render docs/rec.md from run folders and rec result JSON files.")
    parser.add_argument("inputs", type=str, nargs="+", help="run folders, run.json files or result JSON files")
    parser.add_argument("--out", type=Path, default=Path("docs/rec.md"), help="Markdown file to write")
    parser.add_argument("--save", type=Optional[Path], default=None,
                        help="copy the runs read from run folders into this result JSON (so docs can be regenerated)")
    args = parse(parser, argv)
    write_report([Path(p) for p in args.inputs], Path(args.out), args.save, command_line("report", argv))
    print(f"wrote {args.out}")
    return 0


def command_line(command: str, argv: list[str]) -> str:
    return shlex.join(["skip2lora", "rec", command, *argv])


def cmd_teacher_eval(argv: list[str]) -> int:
    from ..env import resolve_device
    from ..paths import atomic_write_json
    from .teacher.evaluate import evaluate_teacher
    from .student.training import set_threads

    parser = _parser("skip2lora rec teacher-eval", "A saved iLoRA or Skip2-LoRA teacher: HR@1 among its candidates "
                     "and the valid ratio (greedy generation), full-catalogue HR/NDCG@K of its grounded scores, and "
                     "their cost.")
    parser.add_argument("--checkpoint", type=Path, required=True,
                        help="OUT/final (or OUT/best) of an ilora or skip2lora run on data.name rec-teacher")
    parser.add_argument("--split", type=str, default="validation", help="validation or test")
    parser.add_argument("--max_users", type=Optional[int], default=None, help="first N users (CPU-sized runs)")
    parser.add_argument("--protocol_users", type=Optional[int], default=None,
                        help="users for the generation protocol (default: max_users; 0 skips it)")
    parser.add_argument("--ks", type=list[int], default=[1, 5, 10, 20], help="cut-offs of the catalogue metrics")
    parser.add_argument("--mask_history", type=bool, default=False, help="score the user's earlier items -inf")
    parser.add_argument("--batch_size", type=int, default=8, help="prompts per forward / generate call")
    parser.add_argument("--device", type=str, default="auto", help="auto, cpu or cuda")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0 = every core)")
    parser.add_argument("--out", type=Optional[Path], default=None, help="also write the result to this JSON file")
    args = parse(parser, argv)
    set_threads(args.threads)
    result = evaluate_teacher(args.checkpoint, args.split, args.ks, args.mask_history, args.max_users,
                              args.protocol_users, args.batch_size, resolve_device(args.device))
    result["generated_by"] = command_line("teacher-eval", argv)
    print(json.dumps(result, indent=2))
    if args.out is not None:
        atomic_write_json(Path(args.out), result)
    return 0


def config_class_parser(prog: str, description: str, cls: type):
    """A parser of one config dataclass (every field, its docstring as help) plus --config FILE."""
    from jsonargparse import ActionConfigFile, set_parsing_settings

    set_parsing_settings(docstring_parse_attribute_docstrings=True)  # the teacher's fields show their docs
    parser = _parser(prog, description)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML config (may also be given first, positionally)")
    parser.add_class_arguments(cls, nested_key=None)
    return parser


def pipeline_parser():
    from .pipeline.config import RecPipelineConfig

    return config_class_parser("skip2lora rec pipeline", "SASRec student -> iLoRA teacher (finetune) -> teacher "
                               "evaluation -> teacher outputs -> distilled students and controls, over the seeds, "
                               "into one folder; resumable, every phase timed (OUT/pipeline.json).", RecPipelineConfig)


def cmd_pipeline(argv: list[str]) -> int:
    from .pipeline.run import run_pipeline
    from .pipeline.config import pipeline_config

    cfg = pipeline_config(parse(pipeline_parser(), argv, config_positional=True).as_dict())
    record = run_pipeline(cfg, command_line("pipeline", argv))
    print(f"pipeline {record['status']}: {cfg.out_dir / 'pipeline.json'}")
    return 0


def speed_parser():
    from .speed.config import RecSpeedConfig

    return config_class_parser("skip2lora rec speed", "The teacher's speed knobs, each against its baseline in one "
                               "run on the same data: warm-up steps untimed, timed steps as mean ± std, each "
                               "measurement in its own process (OUT/speed.json).", RecSpeedConfig)


def cmd_speed(argv: list[str]) -> int:
    from .speed.run import SPEED_JSON, run_speed
    from .speed.config import speed_config
    from .speed.table import render_section

    cfg = speed_config(parse(speed_parser(), argv, config_positional=True).as_dict())
    record = run_speed(cfg, command_line("speed", argv))
    print(render_section(record))
    print(f"wrote {cfg.out_dir / SPEED_JSON}")
    return 0


def cmd_speed_report(argv: list[str]) -> int:
    from .speed.table import write_speed_report

    parser = _parser("skip2lora rec speed-report", "Render the teacher speed table from `rec speed` results.")
    parser.add_argument("inputs", type=str, nargs="+", help="speed.json files or the folders of `rec speed` runs")
    parser.add_argument("--out", type=Path, default=Path("docs/rec_speed.md"), help="Markdown file to write")
    args = parse(parser, argv)
    write_speed_report([Path(p) for p in args.inputs], Path(args.out), command_line("speed-report", argv))
    print(f"wrote {args.out}")
    return 0


COMMANDS = {"student": cmd_student, "distill": cmd_distill, "evaluate": cmd_evaluate, "baselines": cmd_baselines,
            "stats": cmd_stats, "report": cmd_report, "teacher-eval": cmd_teacher_eval, "pipeline": cmd_pipeline,
            "speed": cmd_speed, "speed-report": cmd_speed_report}


def main_rec(argv: list[str]) -> int:
    """Run one `rec` subcommand; bad input raises UserError (the caller prints its one line)."""
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    handler = COMMANDS.get(argv[0])
    if handler is None:
        raise UserError(f"unknown rec command '{argv[0]}': use one of {', '.join(COMMANDS)}")
    return handler(list(argv[1:]))


def main(argv: Optional[list[str]] = None) -> int:
    """Standalone entry (`python -m skip2lora.rec.cli`): the main CLI's error contract."""
    try:
        return main_rec(list(sys.argv[1:] if argv is None else argv))
    except UserError as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
