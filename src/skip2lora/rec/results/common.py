"""Cell formats the recommendation report's parts share (report.py, report_pipeline.py)."""

from __future__ import annotations

from typing import Optional, Sequence

from ...report.stats import mean_std
from ...report.tables import fmt_mean_std


def fmt(values: Sequence[Optional[float]], digits: int = 4) -> str:
    """Mean ± sample std (the project's one mean_std); the mean alone for one value."""
    stat = mean_std(values)
    return "–" if stat.mean is None else fmt_mean_std(stat.to_dict(), f"{{:.{digits}f}}")


def dataset_label(split: dict) -> str:
    """The dataset as runs on it may be compared: its name, and the subset when one was taken."""
    subset = split.get("subset")
    if not subset:
        return split["dataset"]
    parts = [f"{split['users']} of {subset['users_before']} users"]
    if subset.get("recent_interactions"):
        parts.append(f"newest {subset['recent_interactions']} interactions each")
    return f"{split['dataset']} subset: {', '.join(parts)}"


def subset_line(split: dict) -> Optional[str]:
    """The protocol's sentence on the subset (None for the whole dataset)."""
    subset = split.get("subset")
    if not subset:
        return None
    recent = subset.get("recent_interactions")
    return (f"- **Subset** (data.max_users {subset.get('max_users')}, data.recent_interactions {recent}), taken before "
            f"the split: {split['users']} of {subset['users_before']} users, evenly spaced in user-id order"
            + (f", each cut to their newest {recent} interactions" if recent else "")
            + f" ({split['interactions']} of {subset['interactions_before']} interactions). Metrics on a subset are "
            "not comparable with whole-dataset numbers.")
