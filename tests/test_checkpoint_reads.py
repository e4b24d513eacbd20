"""checkpoint_reads: why a checkpoint read failed, its retries, and the outcome all processes share.

The agreement across processes is exercised with two real processes in
tests/training/test_restore_agreement.py; here one process, in-process.
"""

from __future__ import annotations

import errno
import json
import pathlib

import pytest

from softmax_one_jax import checkpoint_reads as cr
from softmax_one_jax.checkpoint_reads import ReadOutcome, classify_read_error
from softmax_one_jax.errors import ConfigError, TransientCheckpointError

# TensorStore's messages as Orbax re-raises them (ValueError, the status code first).
_TS_DATA_LOSS = ('DATA_LOSS: Error opening "cast" driver: Error opening "zarr" driver: Error '
                 'reading "opt_state.0/.zarray" in OCDBT database at local file "/r/2/state/"')
_TS_NOT_FOUND = ('NOT_FOUND: Error opening "zarr" driver: Metadata at "step/.zarray" in OCDBT '
                 'database does not exist')
_TS_UNAVAILABLE = 'UNAVAILABLE: Error reading "gs://b/r/checkpoints/2/state/manifest.ocdbt"'
_TS_DEADLINE = 'DEADLINE_EXCEEDED: Error reading "gs://b/r/checkpoints/2/state/d/8f0e"'


def _json_error() -> json.JSONDecodeError:
  try:
    json.loads("{garbage")
  except json.JSONDecodeError as e:
    return e
  raise AssertionError("unreachable")


def _wrapped(inner: BaseException, outer: BaseException) -> BaseException:
  """``outer`` raised from ``inner``, as Orbax wraps what TensorStore or a handler raised."""
  try:
    try:
      raise inner
    except BaseException as e:  # pylint: disable=broad-except
      raise outer from e
  except BaseException as e:  # pylint: disable=broad-except
    return e


class ServiceUnavailable(Exception):
  """google-api-core's name for an HTTP 503 (matched by name: the package is not needed)."""


@pytest.mark.parametrize("exc,want", [
    # Corrupt: the files are damaged, missing or never finalized.
    (ValueError(_TS_DATA_LOSS), ReadOutcome.CORRUPT),
    (ValueError(_TS_NOT_FOUND), ReadOutcome.CORRUPT),
    (_json_error(), ReadOutcome.CORRUPT),
    (FileNotFoundError(errno.ENOENT, "No such file", "/r/checkpoints/2/data/shard_0-of-2.json"),
     ReadOutcome.CORRUPT),
    (OSError(errno.ENOENT, "No such file"), ReadOutcome.CORRUPT),
    (KeyError('Item "state" was not found in the checkpoint. Available items: [\'data\']'),
     ReadOutcome.CORRUPT),
    (ValueError("Found incomplete checkpoint at /r/checkpoints/2."), ReadOutcome.CORRUPT),
    (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"), ReadOutcome.CORRUPT),
    # Transient: I/O that may pass, however deep in the chain.
    (TimeoutError("The read operation timed out"), ReadOutcome.TRANSIENT),
    (ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"), ReadOutcome.TRANSIENT),
    (OSError(errno.EIO, "Input/output error"), ReadOutcome.TRANSIENT),
    (PermissionError(errno.EACCES, "Permission denied"), ReadOutcome.TRANSIENT),
    (ValueError(_TS_UNAVAILABLE), ReadOutcome.TRANSIENT),
    (ValueError(_TS_DEADLINE), ReadOutcome.TRANSIENT),
    (ServiceUnavailable("503 Backend Error"), ReadOutcome.TRANSIENT),
    (_wrapped(TimeoutError("timed out"), ValueError("Error decoding manifest")),
     ReadOutcome.TRANSIENT),
    (ExceptionGroup("async read", [ValueError("x"), ConnectionError("lost")]),
     ReadOutcome.TRANSIENT),
    # Refused: the user changes something (the error says what).
    (ConfigError("saved with config.data_shards=2; resume with --config.data_shards=2"),
     ReadOutcome.REFUSED),
    (_wrapped(ConfigError("data_shards"), ValueError("restore failed")), ReadOutcome.REFUSED),
    # Incompatible: intact files that do not fit the target.
    (ValueError("User-provided restore item and on-disk value metadata tree structures do not "
                "match"), ReadOutcome.INCOMPATIBLE),
    (ValueError("Requested shape: (3,) is not compatible with the stored shape: (2,)."),
     ReadOutcome.INCOMPATIBLE),
    (KeyError("params"), ReadOutcome.INCOMPATIBLE),
    (RuntimeError("something else"), ReadOutcome.INCOMPATIBLE),
], ids=lambda v: v.name if isinstance(v, ReadOutcome) else type(v).__name__)
def test_classify_read_error(exc: BaseException, want: ReadOutcome):
  assert classify_read_error(exc) == want


def test_corrupt_wrapped_in_an_orbax_error_stays_corrupt():
  exc = _wrapped(ValueError(_TS_DATA_LOSS), RuntimeError("restore of item 'state' failed"))
  assert classify_read_error(exc) == ReadOutcome.CORRUPT


def test_the_agreed_outcome_is_the_worst_one():
  assert cr.agreed_outcome([ReadOutcome.OK, ReadOutcome.OK]) == ReadOutcome.OK
  assert cr.agreed_outcome([ReadOutcome.OK, ReadOutcome.CORRUPT]) == ReadOutcome.CORRUPT
  assert cr.agreed_outcome([ReadOutcome.CORRUPT, ReadOutcome.TRANSIENT]) == ReadOutcome.TRANSIENT
  assert cr.processes_with([ReadOutcome.OK, ReadOutcome.CORRUPT, ReadOutcome.CORRUPT],
                           ReadOutcome.CORRUPT) == [1, 2]


class _FakeCheckpointer:
  """Stands in for ``ocp.Checkpointer``: raises the queued errors, then returns "restored"."""

  def __init__(self, errors: list[BaseException]):
    self.errors, self.calls = errors, 0

  def __call__(self, *args, **kwargs) -> "_FakeCheckpointer":
    return self

  def __enter__(self) -> "_FakeCheckpointer":
    return self

  def __exit__(self, *exc) -> None:
    pass

  def restore(self, path, args=None):  # pylint: disable=unused-argument
    self.calls += 1
    if self.errors:
      raise self.errors.pop(0)
    return "restored"


def test_read_step_retries_transient_errors_with_backoff(monkeypatch, tmp_path: pathlib.Path):
  fake = _FakeCheckpointer([TimeoutError("slow"), ConnectionResetError("reset")])
  monkeypatch.setattr(cr.ocp, "Checkpointer", fake)
  waits: list[float] = []
  read = cr.read_step(tmp_path, 4, lambda step: None, attempts=4, backoff_s=1.5, sleep=waits.append)
  assert read == cr.StepRead(ReadOutcome.OK, restored="restored")
  assert fake.calls == 3 and waits == [1.5, 3.0]


def test_read_step_gives_up_on_a_persistent_transient_error(monkeypatch, tmp_path: pathlib.Path):
  fake = _FakeCheckpointer([TimeoutError(f"slow {i}") for i in range(10)])
  monkeypatch.setattr(cr.ocp, "Checkpointer", fake)
  waits: list[float] = []
  read = cr.read_step(tmp_path, 4, lambda step: None, attempts=3, backoff_s=1.0, sleep=waits.append)
  assert read.outcome == ReadOutcome.TRANSIENT and str(read.error) == "slow 2"
  assert fake.calls == 3 and waits == [1.0, 2.0]


def test_read_step_does_not_retry_a_corrupt_step(monkeypatch, tmp_path: pathlib.Path):
  fake = _FakeCheckpointer([ValueError(_TS_DATA_LOSS)])
  monkeypatch.setattr(cr.ocp, "Checkpointer", fake)
  read = cr.read_step(tmp_path, 4, lambda step: None, attempts=4, backoff_s=1.0,
                      sleep=lambda s: pytest.fail("a corrupt step was retried"))
  assert read.outcome == ReadOutcome.CORRUPT and fake.calls == 1


def test_the_transient_error_names_the_step_the_path_and_the_fix():
  err = cr.transient_error(4, "/r/checkpoints", (ReadOutcome.OK, ReadOutcome.TRANSIENT), None)
  assert isinstance(err, TransientCheckpointError) and isinstance(err, OSError)
  text = str(err)
  for part in ("step 4", "/r/checkpoints/4", "[1]", "transient", "nothing was moved aside",
               "rerun the same command"):
    assert part in text, text
