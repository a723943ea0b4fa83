"""Strategy names as enums that still read, compare and serialise as their strings (YAML, JSON, CLI)."""

from __future__ import annotations

import enum


class Choice(enum.StrEnum):
    """A strategy name: equal to its string, shown as one."""

    def __repr__(self) -> str:
        return repr(self.value)

    @classmethod
    def parse(cls, value, what: str):
        """`value` as a member; a ValueError names `what` and the choices."""
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"{what} {value!r} is not one of {cls.names()}") from None

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(member.value for member in cls)
