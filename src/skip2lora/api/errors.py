"""Bad input to the Python API: one sentence, raised as a ValueError that is also the project's UserError."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from ..errors import UserError


class Skip2LoRAValueError(UserError, ValueError):
    """Bad input to the Python API: a ValueError for Python callers, a UserError (one `error:` line) for the CLI."""


@contextmanager
def as_value_errors() -> Iterator[None]:
    """The project's UserErrors, raised inside, reach API callers as ValueErrors with the same one sentence."""
    try:
        yield
    except Skip2LoRAValueError:
        raise
    except UserError as exc:
        raise Skip2LoRAValueError(str(exc)) from exc
