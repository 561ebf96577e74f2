"""``@value_class``: a dataclass that is frozen where it is checked and plain where it runs.

A migration builds a :class:`~ferryd.migration.kernel_state.TcpKernelState`
and a :class:`~ferryd.migration.records.TcpFlowRecord` for every connection,
on both sides, most of them in its downtime. A frozen dataclass's
``__init__`` sets each field through ``object.__setattr__`` in Python: for
a class of 20 fields that is 3.9 µs a value where a plain slotted one's
``self.x = x`` takes 0.6 (timeit). So the class is a plain slotted
dataclass at run time, and to mypy (strict, in CI) a frozen one
(``dataclass_transform``, PEP 681): it refuses any assignment to a field
outside ``__init__``, which is all that freezing bought here. The values
are not hashable at run time (a plain dataclass that compares has no
``__hash__``); nothing hashes them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

__all__ = ["value_class"]

T = TypeVar("T")

if TYPE_CHECKING:
    from typing_extensions import dataclass_transform

    @dataclass_transform(frozen_default=True)
    def value_class(cls: type[T]) -> type[T]: ...

else:

    def value_class(cls: type[Any]) -> type[Any]:
        return dataclass(slots=True)(cls)
