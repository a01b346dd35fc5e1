"""Pass contract, in the style of torch.fx / onnx-ir pass infrastructure.

A pass states what it requires of its input and what it ensures of its output; both are checked
on every call, so a broken invariant fails at the pass that broke it, not three passes later.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class PassResult(Generic[T]):
    """What a pass returns: its value and whether it changed the model it was given."""

    value: T
    changed: bool


class Pass(Generic[T]):
    """Subclasses implement ``run``; ``requires`` and ``ensures`` raise on a broken contract."""

    name: str = "pass"

    def requires(self, *args: Any, **kwargs: Any) -> None:
        """Check preconditions; raise an ``OsscarError`` with a specific message."""

    def run(self, *args: Any, **kwargs: Any) -> PassResult[T]:
        raise NotImplementedError

    def ensures(self, result: PassResult[T], *args: Any, **kwargs: Any) -> None:
        """Check postconditions of ``result``."""

    def __call__(self, *args: Any, **kwargs: Any) -> PassResult[T]:
        self.requires(*args, **kwargs)
        result = self.run(*args, **kwargs)
        self.ensures(result, *args, **kwargs)
        return result
