"""Record classes without :mod:`dataclasses`: what a dataclass generates, written once.

Importing :mod:`dataclasses` loads ``inspect``, ``ast``, ``dis`` and ``tokenize`` (~4 ms), and each
dataclass then compiles its generated methods when its module is imported (~0.5 ms apiece, more
for frozen or wide ones): together a quarter of a build command's start-up. The records on that
path are plain classes deriving from :class:`Record` (mutable) or :class:`Frozen` instead.

A record class lists its fields in ``__slots__`` (in the order of its constructor's positional
parameters, which take the fields' names as keywords) and writes its ``__init__`` itself; the
base classes give what the dataclass gave, driven by the fields:

* ``==`` between records of the same class, field by field (other classes: ``NotImplemented``);
* a repr like the dataclass's, ``Name(field=value, ...)``;
* :meth:`Record.replace` (``dataclasses.replace``): a new record with some fields changed, made
  by the constructor (so it checks what the constructor checks);
* pickling and ``copy`` (the constructor called with the fields in order);
* :class:`Record` is unhashable, as a mutable dataclass is; :class:`Frozen` refuses assignments
  and hashes by value, as a frozen one does (its ``__init__`` sets the fields with
  ``object.__setattr__``, as the dataclass's did); :class:`Ordered` adds ``<``, ``<=``, ``>``,
  ``>=`` over the fields in order (``order=True``).

Fields whose names start with ``_`` are private slots: not compared, shown, or passed on.
"""

from __future__ import annotations

import operator
from operator import attrgetter

TYPE_CHECKING = False  # (typing.TYPE_CHECKING without importing typing: start-up time)
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, ClassVar, TypeVar

    from typing_extensions import dataclass_transform

    R = TypeVar("R", bound="Record")
else:
    def dataclass_transform(**kwargs: object) -> Callable[[type], type]:  # (for the type checker only)
        return lambda cls: cls


def _fields_of(cls: type) -> tuple[str, ...]:
    names: list[str] = []
    for c in reversed(cls.__mro__):
        slots = c.__dict__.get("__slots__", ())
        names.extend(s for s in ((slots,) if isinstance(slots, str) else slots) if not s.startswith("_"))
    return tuple(names)


class Record:
    """A mutable record: compared by value, unhashable, with :meth:`replace` (see the module)."""

    __slots__ = ()

    #: the fields, in order (from ``__slots__``, the base classes' first)
    _fields: tuple[str, ...] = ()
    #: the fields as a tuple, for comparisons, hashing and pickling
    _values: Callable[[Any], tuple[Any, ...]]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._set_fields(_fields_of(cls))

    @classmethod
    def _set_fields(cls, fields: tuple[str, ...]) -> None:
        cls._fields = fields
        values: Callable[[Any], tuple[Any, ...]]
        if len(fields) > 1:
            values = attrgetter(*fields)
        elif fields:  # (attrgetter of one name gives the value itself)
            one = attrgetter(fields[0])
            values = lambda r: (one(r),)  # noqa: E731
        else:
            values = lambda r: ()  # noqa: E731
        cls._values = staticmethod(values)

    __hash__ = None  # type: ignore[assignment]

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self._values(self) == self._values(other)

    def __repr__(self) -> str:
        return f"{self.__class__.__qualname__}(" + ", ".join(
            f"{name}={getattr(self, name)!r}" for name in self._fields) + ")"

    def replace(self: R, **changes: Any) -> R:
        """A copy with ``changes`` (field names and values), as ``dataclasses.replace`` makes it:
        through the constructor, unchanged fields shared."""
        values = dict(zip(self._fields, self._values(self), strict=True))
        values.update(changes)
        return self.__class__(**values)

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.__class__, self._values(self))


class Frozen(Record):
    """An immutable record: also refuses assignment and deletion, and hashes by value."""

    __slots__ = ()

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"cannot assign to field {name!r} of an immutable {self.__class__.__qualname__}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"cannot delete field {name!r} of an immutable {self.__class__.__qualname__}")

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(self._values(self))


def _compare(op: Callable[[Any, Any], bool]) -> Callable[[Any, Any], Any]:
    def method(self: Any, other: Any) -> Any:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return op(self._values(self), self._values(other))
    return method


class Ordered(Frozen):
    """An immutable record also ordered by its fields, in order (``order=True``)."""

    __slots__ = ()

    __lt__ = _compare(operator.lt)
    __le__ = _compare(operator.le)
    __gt__ = _compare(operator.gt)
    __ge__ = _compare(operator.ge)


_NOTHING = object()


class Field:
    """A :class:`Declared` record's field with a default and ``metadata`` (what
    ``dataclasses.field`` gave): read on the class, it is the default."""

    __slots__ = ("default", "metadata")

    def __init__(self, default: Any, metadata: dict[str, Any]) -> None:
        self.default = default
        self.metadata = metadata

    def __get__(self, obj: object, owner: type | None = None) -> Any:
        return self.default


@dataclass_transform(frozen_default=True)
class Declared(Frozen):
    """An immutable record declared as a dataclass is: its fields are the annotated names of its
    class body, in order, each with its default (a plain value or a :class:`Field`), and its
    constructor takes them positionally or by name. That constructor is a loop, slower than a
    written one: for wide records made rarely (:class:`nartool.config.Config`). The fields live
    in the instance's ``__dict__``, not in slots (a slot cannot have a class-level default)."""

    __slots__ = ()

    #: the defaults of the fields that have one
    _defaults: ClassVar[dict[str, Any]]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        names: list[str] = []
        for c in reversed(cls.__mro__):  # (a subclass adds fields after its bases' ones)
            names.extend(n for n in c.__dict__.get("__annotations__", {}) if not n.startswith("_") and n not in names)
        cls._set_fields(tuple(names))
        declared = {n: cls._declared(n) for n in names}
        cls._defaults = {n: d.default if isinstance(d, Field) else d for n, d in declared.items() if d is not _NOTHING}

    @classmethod
    def _declared(cls, name: str) -> Any:
        """What the class body (of this class or the nearest base) gives field ``name``: its
        default or :class:`Field`; ``_NOTHING`` when none."""
        for c in cls.__mro__:
            if name in c.__dict__:
                return c.__dict__[name]
        return _NOTHING

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        cls = self.__class__
        fields = cls._fields
        if len(args) > len(fields):
            raise TypeError(f"{cls.__qualname__}() takes {len(fields)} positional arguments but {len(args)} were given")
        values = dict(zip(fields, args, strict=False))
        for name, value in kwargs.items():
            if name not in fields:
                raise TypeError(f"{cls.__qualname__}() got an unexpected keyword argument {name!r}")
            if name in values:
                raise TypeError(f"{cls.__qualname__}() got multiple values for argument {name!r}")
            values[name] = value
        for name in fields:
            if name not in values:
                if name not in cls._defaults:
                    raise TypeError(f"{cls.__qualname__}() missing required argument: {name!r}")
                values[name] = cls._defaults[name]
        self.__dict__.update(values)
