"""Reading config fields: comma-list fields ("q,k,v", "IID,Comp"; easy to override on the command line)
and a config group into the frozen dataclass of the code that consumes it. One reader of each, shared by
validation (``config_check``) and the code."""
from __future__ import annotations

import dataclasses


def csv(s) -> list[str]:
    """'a, b,,c' -> ['a', 'b', 'c']."""
    return [x.strip() for x in str(s).split(",") if x.strip()]


def typed(cls, group, **overrides):
    """``cls`` (a frozen dataclass) from the fields of config group ``group`` it declares, then
    ``overrides``. The group's other fields belong to other consumers; a field the group lacks (a stored
    config older than the field) keeps the dataclass default."""
    names = [f.name for f in dataclasses.fields(cls)]
    return cls(**{**{k: group[k] for k in names if k in group}, **overrides})
