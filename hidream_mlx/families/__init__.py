"""The model families, one package each, and the registry the application asks.

Each family implements :class:`hidream_mlx.family.Family` in its package's ``family.py``; adding a
family is adding its package and one line to :data:`FAMILIES`. A ``--model`` goes to the first
family that recognises it; HiDream-O1, the oldest, takes whatever no other family claims (its own
checks then say what is missing).
"""

from __future__ import annotations

from hidream_mlx.family import Family
from hidream_mlx.families.i1.family import E1Family, I1Family
from hidream_mlx.families.o1.family import O1Family

FAMILIES: tuple[Family, ...] = (
    E1Family(),  # before I1: an E1.1 folder holds an I1 transformer, and E1 needs an I1 pipeline as its base
    I1Family(),
    O1Family(),  # last: the fallback
)


def registered() -> tuple[Family, ...]:
    return FAMILIES


def family_named(name: str) -> Family:
    """The family an image's metadata (``"family"``) or a source names."""
    for family in FAMILIES:
        if family.name == name:
            return family
    raise ValueError(f"unknown model family {name!r}; this version knows "
                     f"{', '.join(f.name for f in FAMILIES)}")


def family_of(arg) -> Family:
    """The family of a ``--model`` argument (a folder, a file or a repo id)."""
    for family in FAMILIES[:-1]:
        if family.recognises(str(arg)):
            return family
    return FAMILIES[-1]


def recipe_names() -> list[str]:
    """Every family's recipe names (``--recipe`` choices; the request builder checks the model's)."""
    return sorted({name for family in FAMILIES for name in family.recipes})


def option_choices(name: str) -> tuple:
    """The values a family-specific option takes (``--encoder-bits``: 4, 8), from the family that reads it."""
    return tuple(value for family in FAMILIES for value in family.option_choices.get(name, ()))
