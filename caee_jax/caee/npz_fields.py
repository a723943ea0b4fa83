"""Checked reading of the fields of a calibration .npz file: errors name the file and the field."""

from __future__ import annotations

import zipfile

import numpy as np


def field(archive, path: str, name: str, error: type[ValueError]) -> np.ndarray:
    """archive[name], or `error` naming the file and the field when it is missing or unreadable."""
    if name not in archive.files:
        raise error(f"{path}: missing field {name!r}")
    try:
        return archive[name]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as cause:
        raise error(f"{path}: field {name!r} is unreadable ({cause})") from cause


def integer(archive, path: str, name: str, error: type[ValueError]) -> int:
    """The integer scalar field `name`, or `error` naming the file, the field and what it holds instead."""
    value = field(archive, path, name, error)
    if value.shape != () or not np.issubdtype(value.dtype, np.integer):
        raise error(f"{path}: field {name!r} is {value.dtype} {value.shape}; expected an integer scalar")
    return int(value)


def check_header(archive, path: str, error: type[ValueError], *, format: str, version: int, dims, config) -> None:
    """The file's `format` and `version` fields equal these, and each field of `dims` equals `config`'s."""
    if str(field(archive, path, "format", error)) != format:
        raise error(f"{path}: field 'format' is {str(field(archive, path, 'format', error))!r}, not {format!r}")
    if integer(archive, path, "version", error) != version:
        stored = integer(archive, path, "version", error)
        raise error(f"{path}: field 'version' is {stored}; this reader knows {version}")
    for name in dims:
        stored, expected = integer(archive, path, name, error), getattr(config, name)
        if stored != expected:
            raise error(f"{path}: field {name!r} is {stored}; the model has {expected}")
