"""Loading inputs in batches with a progress bar, shared by the detectors."""

from __future__ import annotations

from typing import Callable, Iterator, Sequence, TypeVar

from tqdm.auto import tqdm

Item = TypeVar("Item")
Loaded = TypeVar("Loaded")


def load_in_batches(
    items: Sequence[Item], batch_size: int, load: Callable[[Item], Loaded], desc: str, unit: str, progress: bool
) -> Iterator[list[Loaded]]:
    """Yield ``load(item)`` for ``batch_size`` items at a time, advancing a progress bar of ``desc``."""
    with tqdm(total=len(items), desc=desc, unit=unit, disable=not progress) as bar:
        for start in range(0, len(items), batch_size):
            batch = [load(item) for item in items[start : start + batch_size]]
            yield batch
            bar.update(len(batch))
