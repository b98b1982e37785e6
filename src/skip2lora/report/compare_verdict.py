"""The words of a `skip2lora compare` result: formatted values and the verdict drawn from the payload.

Every number in a sentence is formatted from the comparison payload (compare.py); a claim between two rows
(a speed-up, a time to target, a quality win) is made only where their data and evaluation set match, and
otherwise the sentence says why it is not made.
"""

from __future__ import annotations

from typing import Optional

from .stats import ratio
from .tables import fmt_mean_std, fmt_number, fmt_times

FORMATS = {
    "steps_per_s": "{:.3f}", "tokens_per_s": "{:,.1f}", "train_time_s": "{:.1f}", "peak_memory_mb": "{:,.0f}",
    "final_train_loss": "{:.4f}", "final_val_loss": "{:.4f}", "best_val_loss": "{:.4f}", "val_loss": "{:.4f}",
    "final_val_acc": "{:.3f}", "best_val_acc": "{:.3f}", "val_acc": "{:.3f}", "trainable_params": "{:,.0f}",
    "cache_build_s": "{:.2f}", "cache_size_mb": "{:.1f}", "cache_hit_rate": "{:.1%}", "time_s": "{:.1f}",
}
METRIC_WORDS = {"val_acc": "validation accuracy", "val_loss": "validation loss"}


def fmt_value(value: Optional[float], key: str) -> str:
    return fmt_number(value, FORMATS.get(key, "{:.4g}"))


def fmt_stat(stat: dict, key: str) -> str:
    """'mean ± std' over seeds in the format of `key`; the mean alone with one seed; '-' with none."""
    return fmt_mean_std(stat, FORMATS.get(key, "{:.4g}"))


def verdict(flag: Optional[bool]) -> str:
    return "spread not judged: < 2 seeds" if flag is None else ("beyond spread" if flag else "within spread")


def seeds_phrase(count: int) -> str:
    return "one seed" if count == 1 else f"mean over {count} seeds"


def claimable(variant: dict) -> bool:
    """Whether a claim against the baseline may be made: the same data and evaluation set."""
    return not variant.get("claim_blocker")


# --------------------------------------------------------------------------------------------
# Conclusion


def spread_sentence(flag: Optional[bool]) -> str:
    if flag is None:
        return "with fewer than 2 seeds on a side, the spread rule cannot judge this difference"
    if flag:
        return "the difference is larger than the seed-to-seed spread"
    return "the difference is within the seed-to-seed spread, so it is not conclusive"


def time_to_quality_sentences(cset: dict) -> list[str]:
    target, variants = cset["target"], cset["variants"]
    base = variants[0]
    word = METRIC_WORDS[target["metric"]]
    if target["value"] is None:
        return [f"The baseline {base['name']} logged no {word}, so there is no time-to-quality target."]
    sentences = [f"Target: {base['name']}'s best {word}, {fmt_value(target['value'], target['metric'])} "
                 f"({seeds_phrase(target['baseline_seeds'])})"
                 + (f"; {target['note']}." if target.get("note") else ".")]
    reached = [v for v in variants if v["time_to_target"]["reached"] and claimable(v)]
    if reached:
        winner = min(reached, key=lambda v: v["time_to_target"]["mean"])
        sentences.append(winner_sentence(winner, base))
        for v in reached:
            if v is not winner and not v["is_baseline"]:
                ttt = v["time_to_target"]
                speed = "" if ttt["speedup"] is None else (f"; {fmt_times(ttt['speedup'])} the baseline's speed, "
                                                           f"{verdict(ttt['beyond_spread'])}")
                sentences.append(f"{v['name']} needs {fmt_stat(ttt, 'time_s')} s ({ttt['reached']}/{ttt['runs']} "
                                 f"runs reached it{speed}).")
    for v in variants:
        if not claimable(v):
            sentences.append(f"No speed-up or time-to-target claim for {v['name']}: {v['claim_blocker']}.")
        elif not v["time_to_target"]["reached"]:
            runs = v["time_to_target"]["runs"]
            where = "its only run" if runs == 1 else f"any of its {runs} runs"
            sentences.append(f"{v['name']} never reached the target in {where}.")
    return sentences


def winner_sentence(winner: dict, base: dict) -> str:
    ttt, base_ttt = winner["time_to_target"], base["time_to_target"]
    if winner["is_baseline"]:
        return (f"The baseline {base['name']} reaches it first, in {fmt_stat(ttt, 'time_s')} s "
                f"({ttt['reached']}/{ttt['runs']} runs); no variant is faster to this quality.")
    text = (f"{winner['name']} reaches it fastest: {fmt_stat(ttt, 'time_s')} s "
            f"({ttt['reached']}/{ttt['runs']} runs) vs ")
    if not base_ttt["reached"]:
        return text + f"never for the baseline {base['name']}."
    return (text + f"{fmt_stat(base_ttt, 'time_s')} s for {base['name']} ({base_ttt['reached']}/{base_ttt['runs']} "
            f"runs), a {fmt_times(ttt['speedup'])} speed-up; {spread_sentence(ttt['beyond_spread'])}.")


def comparison_phrase(base: dict, variant: dict, key: str, better: str) -> str:
    b, v = base["metrics"][key], variant["metrics"][key]
    return f"{better} ({fmt_stat(b, key)} vs {fmt_stat(v, key)}: {v['delta_pct']:+.1f}%, {verdict(v['beyond_spread'])})"


def baseline_wins(cset: dict) -> list[str]:
    """Where the baseline is better than each variant on quality (a better mean, with the verdict)."""
    base = cset["variants"][0]
    checks = [("best_val_acc", "a higher best validation accuracy", True),
              ("best_val_loss", "a lower best validation loss", False),
              ("final_val_loss", "a lower final validation loss", False)]
    sentences = []
    for variant in filter(claimable, cset["variants"][1:]):
        phrases = []
        for key, better, higher in checks:
            b, v = base["metrics"][key]["mean"], variant["metrics"][key]
            if b is None or v["mean"] is None or v["delta_pct"] is None:
                continue
            if (b > v["mean"]) if higher else (b < v["mean"]):
                phrases.append(comparison_phrase(base, variant, key, better))
        if phrases:
            sentences.append(f"Against {variant['name']}, the baseline {base['name']} keeps "
                             + "; ".join(phrases) + ".")
        else:
            sentences.append(f"{base['name']} is not better than {variant['name']} on best or final validation "
                             "loss" + (" or accuracy." if cset["has_accuracy"] else "."))
    return sentences


def cost_sentences(cset: dict) -> list[str]:
    base = cset["variants"][0]
    sentences = []
    for v in filter(claimable, cset["variants"][1:]):
        steps, memory = v["metrics"]["steps_per_s"], v["metrics"]["peak_memory_mb"]
        relative_speed = ratio(steps["mean"], base["metrics"]["steps_per_s"]["mean"])
        if relative_speed is None or memory["delta_pct"] is None:
            continue
        sentences.append(f"{v['name']} runs {fmt_times(relative_speed)} the baseline's steps per second of "
                         "training time "
                         f"({verdict(steps['beyond_spread'])}) with {memory['delta_pct']:+.1f}% peak memory "
                         f"({verdict(memory['beyond_spread'])}).")
    return sentences


def equal_time_sentence(cset: dict) -> Optional[str]:
    metric = cset["target"]["metric"]
    if cset["equal_time_s"] is None:
        return None
    values = ", ".join(f"{v['name']} {fmt_stat(v['at_equal_time'][metric], metric)}"
                       for v in filter(claimable, cset["variants"]))
    return (f"At equal wall-clock ({fmt_value(cset['equal_time_s'], 'time_s')} s of training, when the shortest "
            f"run ended), {METRIC_WORDS[metric]}: {values}.")


def conclusion(cset: dict) -> str:
    """A paragraph that states the comparison's outcome; every number comes from the payload."""
    sentences = time_to_quality_sentences(cset) + cost_sentences(cset)
    if len(cset["variants"]) > 1:
        sentences += baseline_wins(cset)
    at_equal = equal_time_sentence(cset)
    return " ".join(sentences + ([at_equal] if at_equal else []))


def verdict_paragraph(payload: dict) -> str:
    """The answer first: each comparison set's conclusion, in one paragraph, and what was kept apart."""
    several = len(payload["sets"]) > 1
    parts = [f"{cset['name']}: {cset['conclusion']}" if several else cset["conclusion"] for cset in payload["sets"]]
    split = [w for w in payload["warnings"] if "not pooled as seeds" in w]
    if split:
        parts.append(f"Runs that differ in more than the seed were kept as separate rows ({len(split)} "
                     "variant(s)); the settings table of each set shows what differs.")
    return " ".join(parts)
