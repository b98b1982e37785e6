"""Datasets for the paper study: a source domain to pretrain on and a shifted target domain.

Three sources of data, each split the same way (source / target-train / target-test):
- digits: scikit-learn's bundled 8x8 digits; the target half is rotated, re-contrasted and noisy.
- fan: a synthetic fan-vibration generator (normal and two kinds of damaged fan); the source is a
  quiet room, the target a room next to a ventilation fan (extra tones, louder coloured noise).
- har: the UCI HAR text files when the user has them; source = the training subjects, target =
  the test subjects (people the pretrained model never saw).
Features are standardised with the source statistics only: the deployed model knows nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ...errors import UserError

DATASETS = ("digits", "fan", "har")
STD_FLOOR = 1.0  # fraction of the mean feature std below which a feature is not scaled up further
FAN_CLASSES = ("normal", "damage1", "damage2")
HAR_CLASSES = ("walking", "walking_upstairs", "walking_downstairs", "sitting", "standing", "laying")


@dataclass
class DomainShiftData:
    """Source-domain data to pretrain on, and target-domain data to fine-tune and test on."""

    name: str
    source_x: torch.Tensor
    source_y: torch.Tensor
    target_train_x: torch.Tensor
    target_train_y: torch.Tensor
    target_test_x: torch.Tensor
    target_test_y: torch.Tensor
    class_names: tuple[str, ...]
    shift: str
    details: dict = field(default_factory=dict)

    @property
    def num_features(self) -> int:
        return int(self.source_x.shape[1])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def summary(self) -> dict:
        return {
            "name": self.name,
            "features": self.num_features,
            "classes": list(self.class_names),
            "source": int(self.source_x.shape[0]),
            "target_train": int(self.target_train_x.shape[0]),
            "target_test": int(self.target_test_x.shape[0]),
            "shift": self.shift,
            **self.details,
        }


def _standardised(
    name: str,
    source: tuple[np.ndarray, np.ndarray],
    target: tuple[np.ndarray, np.ndarray],
    rng: np.random.Generator,
    class_names: tuple[str, ...],
    shift: str,
    details: dict | None = None,
) -> DomainShiftData:
    """Scale every split by the source mean/std and cut the target in a train and a test half."""
    source_x, source_y = source
    target_x, target_y = target
    mean = source_x.mean(axis=0)
    std = source_x.std(axis=0)
    # Pixels that never vary in the source (digit borders) get the typical scale, not a near-zero one.
    std = np.maximum(std, STD_FLOOR * std.mean() + 1e-8)

    order = rng.permutation(len(target_x))
    half = len(order) // 2
    train_idx, test_idx = order[:half], order[half:]

    def tensors(x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        scaled = ((x - mean) / std).astype(np.float32)
        return torch.from_numpy(scaled), torch.from_numpy(y.astype(np.int64))

    sx, sy = tensors(source_x, source_y)
    tx, ty = tensors(target_x[train_idx], target_y[train_idx])
    vx, vy = tensors(target_x[test_idx], target_y[test_idx])
    return DomainShiftData(name, sx, sy, tx, ty, vx, vy, class_names, shift, details or {})


# -- digits -----------------------------------------------------------------------------------

DIGITS_ROTATION_DEG = (15.0, 25.0)
DIGITS_GAMMA = 0.7
DIGITS_NOISE = 1.0
DIGITS_LIFT = 1.0


def shift_digit_images(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Rotate each 8x8 image, brighten its strokes (gamma < 1), lift the background and add noise.

    Pixel values stay in the digits' 0..16 range, as a different camera would still report.
    """
    from scipy.ndimage import rotate

    angles = rng.uniform(*DIGITS_ROTATION_DEG, size=len(images))
    rotated = np.stack([rotate(img, angle, reshape=False, order=1, mode="constant") for img, angle in zip(images, angles)])
    contrast = 16.0 * np.clip(rotated / 16.0, 0.0, 1.0) ** DIGITS_GAMMA
    lifted = DIGITS_LIFT + (1.0 - DIGITS_LIFT / 16.0) * contrast
    noisy = lifted + rng.normal(0.0, DIGITS_NOISE, size=lifted.shape)
    return np.clip(noisy, 0.0, 16.0)


def digits_shift(seed: int, tiny: bool = False) -> DomainShiftData:
    """Half the digits as they are (source), the other half shifted (target)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(bunch.target))
    if tiny:
        order = order[:240]
    half = len(order) // 2
    src, tgt = order[:half], order[half:]
    source_x = bunch.images[src].reshape(len(src), -1)
    target_x = shift_digit_images(bunch.images[tgt], rng).reshape(len(tgt), -1)
    shift = (
        f"target images rotated by {DIGITS_ROTATION_DEG[0]:g}-{DIGITS_ROTATION_DEG[1]:g} degrees, "
        f"stroke gamma {DIGITS_GAMMA:g}, background lifted by {DIGITS_LIFT:g}, Gaussian noise sigma {DIGITS_NOISE:g} (0..16 scale)"
    )
    names = tuple(str(d) for d in range(10))
    return _standardised("digits", (source_x, bunch.target[src]), (target_x, bunch.target[tgt]), rng, names, shift)


# -- synthetic fan vibration ------------------------------------------------------------------

FAN_RATE_HZ = 1024.0
FAN_WINDOW = 512  # 0.5 s windows: 2 Hz bins, 256 of them after dropping DC
FAN_BLADES = 7
FAN_RPM = (1500.0, 2000.0, 2500.0)  # three speed settings, like a fan controller's low/mid/high
FAN_RPM_JITTER = 0.03
VENT_HZ = (45.0, 60.0)
VENT_BLADES = 5
VENT_LEVEL = 0.4  # amplitude of the ventilation fan's fundamental (the fan's blade pass is ~1.0)
RUMBLE_SIGMA = 0.03
NOISY_WHITE_GAIN = 1.5


def _tones(freqs: np.ndarray, amps: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Sum of sinusoids with random phases; freqs and amps are (samples, tones)."""
    t = np.arange(FAN_WINDOW) / FAN_RATE_HZ
    phases = rng.uniform(0.0, 2.0 * np.pi, size=freqs.shape)
    waves = amps[..., None] * np.sin(2.0 * np.pi * freqs[..., None] * t + phases[..., None])
    return waves.sum(axis=1)


def fan_vibration_signals(labels: np.ndarray, noisy_room: bool, rng: np.random.Generator) -> np.ndarray:
    """Accelerometer windows of a fan; label 0 normal, 1 unbalanced (holes), 2 chipped blade.

    A normal fan shows its blade-pass tone (blades x rotation) and its harmonic. Unbalance adds
    strong 1x and 2x rotation tones; a chipped blade modulates the blade pass, adding sidebands
    at blade-pass +- rotation. The noisy room adds a ventilation fan (its own rotation harmonics
    and blade pass, overlapping the classes' bands), louder coloured noise and a softer mounting.
    """
    from scipy.signal import lfilter

    n = len(labels)
    setting = rng.choice(np.asarray(FAN_RPM), size=n)
    rot = setting * rng.uniform(1.0 - FAN_RPM_JITTER, 1.0 + FAN_RPM_JITTER, size=n) / 60.0
    bpf = FAN_BLADES * rot

    def jitter() -> np.ndarray:
        """Per-sample amplitude spread: no two fans (or mountings) ring exactly alike."""
        return rng.uniform(0.7, 1.3, size=n)

    zero = np.zeros(n)
    unbalance = labels == 1
    chipped = labels == 2
    freqs = np.stack([bpf, 2 * bpf, rot, 2 * rot, bpf - rot, bpf + rot, 3 * rot], axis=1)
    amps = np.stack(
        [
            1.0 * jitter(),
            0.4 * jitter(),
            0.08 * jitter() + np.where(unbalance, 0.6 * jitter(), zero),
            np.where(unbalance, 0.25 * jitter(), 0.03 * jitter()),
            np.where(chipped, 0.35 * jitter(), zero),
            np.where(chipped, 0.35 * jitter(), zero),
            np.where(chipped, 0.15 * jitter(), zero),
        ],
        axis=1,
    )
    signal = _tones(freqs, amps, rng)
    white = rng.normal(0.0, 0.05, size=signal.shape)
    if not noisy_room:
        return signal + white
    vent = rng.uniform(*VENT_HZ, size=n)
    vent_freqs = np.stack([vent, 2 * vent, 3 * vent, VENT_BLADES * vent], axis=1)
    vent_amps = VENT_LEVEL * np.stack([1.0 * jitter(), 0.6 * jitter(), 0.4 * jitter(), 1.0 * jitter()], axis=1)
    mounting = rng.uniform(0.6, 0.9, size=(n, 1))
    # Low-frequency rumble: white noise through a one-pole low-pass filter.
    rumble = lfilter([1.0], [1.0, -0.9], rng.normal(0.0, RUMBLE_SIGMA, size=signal.shape), axis=1)
    return mounting * signal + _tones(vent_freqs, vent_amps, rng) + rumble + NOISY_WHITE_GAIN * white


def vibration_spectrum(signals: np.ndarray) -> np.ndarray:
    """Log-magnitude spectrum without the DC bin: one feature per 2 Hz bin (256 features)."""
    window = np.hanning(FAN_WINDOW)
    magnitude = np.abs(np.fft.rfft(signals * window, axis=1))[:, 1:]
    return np.log(magnitude + 1e-3)


def fan_shift(seed: int, tiny: bool = False) -> DomainShiftData:
    """Quiet-room fans (source) against fans next to a ventilation fan (target)."""
    rng = np.random.default_rng(seed)
    per_class_source, per_class_target = (40, 40) if tiny else (400, 400)
    source_y = np.repeat(np.arange(3), per_class_source)
    target_y = np.repeat(np.arange(3), per_class_target)
    source_x = vibration_spectrum(fan_vibration_signals(source_y, noisy_room=False, rng=rng))
    target_x = vibration_spectrum(fan_vibration_signals(target_y, noisy_room=True, rng=rng))
    shift = (
        f"target fans run next to a ventilation fan ({VENT_HZ[0]:g}-{VENT_HZ[1]:g} Hz, {VENT_BLADES} blades), "
        "with louder low-frequency noise and a softer mounting (gain 0.6-0.9)"
    )
    details = {"sample_rate_hz": FAN_RATE_HZ, "window": FAN_WINDOW, "blades": FAN_BLADES, "rpm": list(FAN_RPM), "rpm_jitter": FAN_RPM_JITTER}
    return _standardised("fan", (source_x, source_y), (target_x, target_y), rng, FAN_CLASSES, shift, details)


# -- UCI HAR ----------------------------------------------------------------------------------


def _har_root(path: Path) -> Path:
    """Accept the 'UCI HAR Dataset' folder itself or the folder that contains it."""
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"HAR path {path} does not exist: pass --har_path the 'UCI HAR Dataset' folder")
    nested = path / "UCI HAR Dataset"
    if not (path / "train").is_dir() and nested.is_dir():
        return nested
    return path


def _loadtxt(path: Path, what: str) -> np.ndarray:
    """Whitespace-separated numbers; on a bad file, name the first offending line."""
    if not path.is_file():
        raise UserError(f"HAR file {path} is missing: --har_path must hold train/X_train.txt, train/y_train.txt, test/X_test.txt, test/y_test.txt")
    try:
        values = np.loadtxt(path, dtype=np.float64, ndmin=2)
    except ValueError:
        values = None
    width = None
    if values is None or values.size == 0:
        with open(path) as handle:
            for lineno, line in enumerate(handle, start=1):
                tokens = line.split()
                if not tokens:
                    continue
                try:
                    [float(token) for token in tokens]
                except ValueError:
                    raise UserError(f"HAR file {path} line {lineno}: '{line.strip()[:40]}' is not whitespace-separated numbers; fix or re-extract the {what} file") from None
                if width is not None and len(tokens) != width:
                    raise UserError(f"HAR file {path} line {lineno} has {len(tokens)} values, earlier lines {width}: every row of the {what} file needs the same count")
                width = len(tokens)
        if width is None:
            raise UserError(f"HAR file {path} holds no rows: re-extract the {what} file")
        raise UserError(f"HAR file {path} could not be read as a table of numbers: re-extract the {what} file")
    return values


def read_har_split(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Features and 0-based labels of one split ('train' or 'test') of the UCI HAR text files."""
    root = _har_root(root)
    x = _loadtxt(root / split / f"X_{split}.txt", f"{split} feature")
    y_raw = _loadtxt(root / split / f"y_{split}.txt", f"{split} label")
    if y_raw.shape[1] != 1:
        raise UserError(f"HAR labels {root / split / f'y_{split}.txt'} have {y_raw.shape[1]} columns: expected one label (1..6) per line")
    y = y_raw[:, 0]
    if len(y) != len(x):
        raise UserError(f"HAR {split} split has {len(x)} feature rows but {len(y)} labels: the X_{split}.txt and y_{split}.txt files must match")
    if not np.all(np.isin(y, np.arange(1, len(HAR_CLASSES) + 1))):
        bad = y[~np.isin(y, np.arange(1, len(HAR_CLASSES) + 1))][0]
        raise UserError(f"HAR {split} label {bad:g} is outside 1..{len(HAR_CLASSES)}: y_{split}.txt must hold activity ids 1..6")
    return x, y.astype(np.int64) - 1


def har_shift(path: Path, seed: int, tiny: bool = False) -> DomainShiftData:
    """Training subjects (source) against the unseen test subjects (target)."""
    source_x, source_y = read_har_split(path, "train")
    target_x, target_y = read_har_split(path, "test")
    if source_x.shape[1] != target_x.shape[1]:
        raise UserError(f"HAR train rows have {source_x.shape[1]} features, test rows {target_x.shape[1]}: both splits must come from the same release")
    rng = np.random.default_rng(seed)
    if tiny:
        source_idx = rng.permutation(len(source_x))[:300]
        target_idx = rng.permutation(len(target_x))[:200]
        source_x, source_y = source_x[source_idx], source_y[source_idx]
        target_x, target_y = target_x[target_idx], target_y[target_idx]
    shift = "target = the test subjects, people absent from the pretraining (training) subjects"
    return _standardised("har", (source_x, source_y), (target_x, target_y), rng, HAR_CLASSES, shift, {"path": str(path)})


def load_domain_shift(name: str, seed: int, har_path: Path | None = None, tiny: bool = False) -> DomainShiftData:
    """One dataset by name: digits, fan or har (har needs the path of the UCI HAR text files)."""
    if name == "digits":
        return digits_shift(seed, tiny)
    if name == "fan":
        return fan_shift(seed, tiny)
    if name == "har":
        if har_path is None:
            raise UserError("dataset har needs --har_path: the 'UCI HAR Dataset' folder with train/ and test/ text files")
        return har_shift(har_path, seed, tiny)
    raise UserError(f"unknown dataset '{name}': use one of {', '.join(DATASETS)} or all")
