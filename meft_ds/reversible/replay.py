"""The replay contract of a module whose forward makes decisions a recomputation must reuse.

The reversible backward (:mod:`meft_ds.reversible.coupling`) recomputes every block from
inputs reconstructed from the layer's outputs, which may differ from the forward's in
the last bits. A module whose output depends on more than its input, its parameters and
the RNG (the sparse adapter: its router's experts, the rows selected on the CPU and the
working set fetched for them) must then reuse the forward's decisions, or the
recomputed graph would not be the one whose output the forward produced.

Such a module is :class:`Replayable`: before each forward call the reversible stack asks
it for a record (:meth:`~Replayable.rev_capture`), the forward call fills it, and the
backward recomputation runs inside :meth:`~Replayable.rev_replay` with that record. A
record applies to the one forward call that follows its capture; modules without the
two methods are recomputed as they are (their RNG state is restored by the stack).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Protocol, TypeVar, runtime_checkable

Record = TypeVar("Record")


@runtime_checkable
class Replayable(Protocol[Record]):
    """A module that records its forward decisions and replays them in a recomputation."""

    def rev_capture(self) -> Record:
        """A record that the next forward call fills with its decisions."""
        ...

    def rev_replay(self, record: Record) -> AbstractContextManager[None]:
        """Within the context, forward calls reuse ``record``'s decisions instead of
        deciding again."""
        ...
