"""Independent work items run in this process, or as Ray tasks (``--workers N``, ``--ray-address``).

The per-group error curves are independent solver runs on the dense Gram matrices: each is a
pure function of its layer problem, so a task's result is the serial run's (docs/design.md,
"Scale"). Ray is optional: it is imported only when more than one worker or a cluster address is
asked for, and its absence is a clear error then.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from typing import Any, TypeVar

from osscar_export.errors import OsscarError

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class Engine:
    """Where independent items run: here (``workers == 1``, no address), or as Ray tasks on
    ``workers`` local worker processes, or on the cluster at ``address``."""

    workers: int = 1
    address: str | None = None

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise OsscarError(f"--workers {self.workers}: give at least 1")

    @property
    def name(self) -> str:
        return "ray" if self.workers > 1 or self.address else "local"

    def describe(self) -> dict[str, Any]:
        """What the report records: the engine, its workers and the cluster address, if any."""
        return {"engine": self.name, "workers": self.workers, "address": self.address}

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> Iterator[R]:
        """``fn`` of each item, yielded in order. Items are drawn lazily: with Ray at most two
        tasks per worker are in flight, so the driver never holds every item's inputs at once."""
        if self.name == "local":
            yield from map(fn, items)
            return
        ray = _ray(self)
        task = ray.remote(num_cpus=1)(fn)
        pending = iter(items)
        in_flight = deque(task.remote(x) for x in islice(pending, 2 * self.workers))
        while in_flight:
            ref = in_flight.popleft()
            in_flight.extend(task.remote(x) for x in islice(pending, 1))  # the next one starts before we wait
            yield ray.get(ref)


def _ray(engine: Engine) -> Any:
    """Ray, started for ``engine`` (a local instance with its workers, or connected to its
    address) unless this process already is connected."""
    try:
        import ray
    except ImportError:
        raise OsscarError("--workers above 1 or --ray-address needs Ray: pip install 'osscar-export[ray]'") from None
    if not ray.is_initialized():
        try:
            if engine.address:
                ray.init(address=engine.address, log_to_driver=False)
            else:
                ray.init(num_cpus=engine.workers, include_dashboard=False, log_to_driver=False)
        except Exception as e:  # a cluster that is not there, a port taken: say which engine failed
            raise OsscarError(f"could not start Ray ({'address ' + engine.address if engine.address else f'{engine.workers} local workers'}): "
                              f"{type(e).__name__}: {e}") from e
    return ray
