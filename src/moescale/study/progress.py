"""One progress display for a whole study (`StudyProgress`): a single tqdm bar over the
training steps of every run still to train, then over its evaluations, labelled with the run
and what is happening to it; messages print above it. The trainer's own per-run bar is off
meanwhile (`Experiment.launch(progress=False)`).

The bar learns of training steps through the data: `ticking(data)` wraps a data source so
that each training batch the trainer takes (one per step) moves the bar, without a hook in
the trainer.
"""

from __future__ import annotations

import sys
from typing import Any


class StudyProgress:
  """enabled=False: nothing is drawn and `note` prints plain lines (logs, tests)."""

  def __init__(self, name: str, enabled: bool = True, file=None):
    self.name, self.enabled = name, enabled
    self.file = file or sys.stderr
    self._bar = None

  def phase(self, what: str, total: int, unit: str) -> None:
    """Starts (or restarts) the bar over `total` units of a new phase."""
    if not self.enabled:
      return
    from tqdm.auto import tqdm
    if self._bar is None:
      self._bar = tqdm(total=total, unit=unit, dynamic_ncols=True, mininterval=0.5,
                       file=self.file, desc=f'{self.name}: {what}')
    else:
      self._bar.unit = unit
      self._bar.set_description(f'{self.name}: {what}', refresh=False)
      self._bar.reset(total=total)

  def label(self, text: str) -> None:
    if self._bar is not None:
      self._bar.set_postfix_str(text, refresh=True)

  def advance(self, n: int = 1) -> None:
    if self._bar is not None:
      self._bar.update(n)

  def note(self, message: str) -> None:
    """A line above the bar (or on its own without one)."""
    if self._bar is not None:
      self._bar.write(message, file=self.file)
    else:
      print(message, file=self.file, flush=True)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
      self._bar = None

  def ticking(self, data):
    """`data` whose training iterators advance the bar by one per batch taken."""
    return _TickingData(data, self.advance)


class _TickingData:
  """A data source (see `moescale.train.trainer.DataSource`) passing everything through, its
  training batches counted."""

  def __init__(self, data, tick):
    self._data, self._tick = data, tick

  def train_iterator(self, *args, **kwargs):
    return _TickingIterator(self._data.train_iterator(*args, **kwargs), self._tick)

  def __getattr__(self, name: str) -> Any:
    return getattr(self._data, name)


class _TickingIterator:

  def __init__(self, it, tick):
    self._it, self._tick = it, tick

  def __iter__(self):
    return self

  def __next__(self):
    batch = next(self._it)
    self._tick()
    return batch

  def __getattr__(self, name: str) -> Any:  # position() and whatever else the source offers
    return getattr(self._it, name)
