"""How list-valued config fields are written: comma strings ("q,k,v", "IID,Comp"), easy to override
on the command line. One reader, shared by validation (``config_check``) and the code that uses them."""
from __future__ import annotations


def csv(s) -> list[str]:
    """'a, b,,c' -> ['a', 'b', 'c']."""
    return [x.strip() for x in str(s).split(",") if x.strip()]
