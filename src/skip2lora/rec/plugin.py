"""rec plugs into the core: importing this module registers everything the core can reach of it.

- the iLoRA method (methods registry, by importing teacher.ilora) and its config section (config extension);
- the `rec-teacher` and `rec-teacher-history` data sources (next-item prompts for the teacher on the one
  fine-tuning loop);
- the iLoRA checkpoint loader (`generate` / `predict` on OUT/final of an ilora run);
- the report of recommendation run folders (`skip2lora compare` hands them to it).
The core finds this file through skip2lora.plugins; it never imports rec by name.
"""

from __future__ import annotations

from ..config import register_config_extension
from ..data import register_source
from ..inference import register_checkpoint_loader
from ..report.registry import register_run_report
from .results.document import compare_students
from .teacher import ilora  # noqa: F401 - registers the ilora method
from .teacher.config import TeacherFinetuneConfig
from .teacher.prompts import TEACHER_SOURCES
from .teacher.source import load_rec_teacher

register_config_extension(TeacherFinetuneConfig)
for _source in TEACHER_SOURCES:  # candidate prompts, history-only prompts
    register_source(_source, load_rec_teacher)
register_checkpoint_loader("ilora", ilora.load_ilora)
register_run_report("rec", compare_students)
