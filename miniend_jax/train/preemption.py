"""Stopping every host at the same step when any one of them is told to stop.

SIGTERM (what TPU VMs and cluster schedulers send before a preemption) and
SIGINT (Ctrl-C) only reach the host they are sent to, and not at the same
moment as on the others. If that host alone saved and left, the others would
wait forever in the next step's collectives. So a signal only sets a flag on
its host, and the hosts agree on it through an all-reduce of their flags that
runs beside every step: every host learns that one of them was signalled
after the same step, saves that step together with the others, and exits.

The all-reduce of step t is read one step later, after step t+1 has been
dispatched, so the host never waits for the device more than it would
anyway; a stop then happens one step after the signal. A single-process job
reads its own flag directly.

The handlers are installed when the run starts, after JAX's distributed
runtime (whose own SIGTERM handler would otherwise swallow the signal), so a
signal while the run loads its weights or compiles is not lost: the hosts
agree once before the first step (`agree_now`; they stop there, with nothing
to save beyond the checkpoint they started from), and the first step's poll
is read at once, so a signal during the first step's compile stops the run
after that step.

A second Ctrl-C aborts at once (KeyboardInterrupt), without saving.
"""

from __future__ import annotations

import logging
import signal

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

EXIT_CODES = {signal.SIGTERM: 0, signal.SIGINT: 130}


class StopSignals:
  """Catches SIGTERM / SIGINT and agrees across hosts on when to stop.

    with StopSignals() as stop:
      for step ...:
        state = train_step(state, ...)
        if stop.should_stop():   # the same answer on every host, at the same step
          break
    save(...); exit(stop.exit_code)
  """

  def __init__(self):
    self.signal: int | None = None  # the first signal this host received
    self._previous: dict[int, object] = {}
    self._multi_process = jax.process_count() > 1
    self._pending = None  # the all-reduce dispatched at the last poll
    self._polls = 0
    self._agreed = False
    if self._multi_process:
      devices = np.asarray(jax.devices())
      self._sharding = NamedSharding(Mesh(devices, ("hosts",)), PartitionSpec("hosts"))
      self._any = jax.jit(jnp.max, out_shardings=NamedSharding(Mesh(devices, ("hosts",)),
                                                               PartitionSpec()))

  def __enter__(self) -> "StopSignals":
    for signum in EXIT_CODES:
      self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for signum, previous in self._previous.items():
      # A handler installed from C (e.g. JAX's own SIGTERM notifier) reads back as None.
      signal.signal(signum, previous if previous is not None else signal.SIG_DFL)

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    if self.signal is not None:
      if signum == signal.SIGINT:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        raise KeyboardInterrupt("second Ctrl-C: stopping without saving")
      return
    self.signal = signum
    logging.warning("%s received: every host saves a checkpoint after the current step and "
                    "stops (press Ctrl-C again to abort without saving).",
                    signal.Signals(signum).name)

  @property
  def requested(self) -> bool:
    """Whether this host received a signal (not yet agreed with the others)."""
    return self.signal is not None

  @property
  def signal_name(self) -> str | None:
    """"SIGTERM" / "SIGINT" when this host was signalled, else None."""
    return signal.Signals(self.signal).name if self.signal is not None else None

  @property
  def exit_code(self) -> int:
    """0 after SIGTERM (a preemption is not a failure), 130 after Ctrl-C, as shells expect."""
    return EXIT_CODES.get(self.signal, 0) if self.signal is not None else 0

  def should_stop(self) -> bool:
    """Call once per step, after dispatching it, on every host. True on every host
    at the same call once any host has been signalled. The first call (after the
    first step, which compiles: the wait is nothing beside it) is answered at once."""
    self._polls += 1
    if self._polls == 1:
      return self.agree_now()
    if not self._multi_process:
      return self.requested
    if self._agreed:
      return True
    previous, self._pending = self._pending, self._any(self._local_flag())
    if previous is not None and int(np.asarray(previous.addressable_data(0))):
      self._agreed = True
    return self._agreed

  def agree_now(self) -> bool:
    """Whether any host has been signalled, the same answer on every host (every host
    calls it at the same point; it waits for the others)."""
    if not self._multi_process:
      return self.requested
    if not self._agreed:
      self._agreed = bool(int(np.asarray(self._any(self._local_flag()).addressable_data(0))))
    return self._agreed

  def _local_flag(self) -> jax.Array:
    flag = np.asarray([int(self.requested)], np.int32)
    return jax.make_array_from_callback((jax.device_count(),), self._sharding, lambda _: flag)
