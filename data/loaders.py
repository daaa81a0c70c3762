"""ResumableLoader: a DataLoader that Lightning can restart in the middle of an epoch.

Lightning stores a train loader's ``state_dict()`` in every checkpoint and calls ``load_state_dict()``
before iterating after a restart, but only for loaders that have these methods; a plain DataLoader
starts the epoch over, so a run resumed mid-epoch trains on some batches twice and ends elsewhere than
an uninterrupted one. Both products use this loader for their training epoch (editing rounds and the
TaCQ calibration epoch).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch.utils.data import DataLoader


class ResumableLoader(DataLoader):
    """A DataLoader that remembers how many batches of the epoch it has handed out.

    After ``load_state_dict`` the next iteration skips the batches already done (fetched and dropped: the
    items of both products are pre-tokenized, so this is cheap). The order itself must be a function of
    (seed, epoch) only, fixed before the loader exists, for the skipped batches to be the ones done.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.batches_done = 0
        self._skip = 0

    def __iter__(self) -> Iterator[Any]:
        skip, self._skip = self._skip, 0
        self.batches_done = skip
        for index, batch in enumerate(super().__iter__()):
            if index < skip:
                continue
            self.batches_done = index + 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"batches_done": self.batches_done}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._skip = self.batches_done = int(state["batches_done"])
