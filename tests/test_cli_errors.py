"""User errors end in one message that names the fix, exit status 2 and no traceback.

Each case runs the real ``softmax-one`` command in a subprocess, as a user would; the in-process
tests check that internal errors keep their traceback and that a full disk is recognised
through the wrappers Orbax and TensorStore put around it.
"""

from __future__ import annotations

import errno
import gzip
import pathlib
import subprocess
import sys

import pytest

from softmax_one_jax import cli, rundir
from softmax_one_jax.data import corpus
from softmax_one_jax.errors import ConfigError, disk_full_cause
from tests.training._micro import MICRO, cpu_env, micro_config

FLAG_LIST_LINE = "--workdir: Run directory"    # what absl's flag dump would show


def _softmax_one(*args: str, cwd: pathlib.Path) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "softmax_one_jax.cli", *args], cwd=cwd,
                        env=cpu_env(1), capture_output=True, text=True, timeout=300)


def _assert_user_error(done: subprocess.CompletedProcess, command: str, *phrases: str) -> None:
  assert done.returncode == 2, done.stderr[-3000:]
  assert "Traceback" not in done.stderr, done.stderr[-3000:]
  assert FLAG_LIST_LINE not in done.stderr, done.stderr[-3000:]
  message = done.stderr.strip().splitlines()[-1]
  assert message.startswith(f"softmax-one {command}: error: "), done.stderr[-3000:]
  for phrase in phrases:
    assert phrase in message, message


def _write_files(tmp: pathlib.Path) -> None:
  (tmp / "notes.txt").write_text("One paragraph.\n\nAnother one.\n")
  (tmp / "latin1.txt").write_bytes("caf\u00e9 au lait\n\nna\u00efve\n".encode("latin-1"))
  (tmp / "garbage.tiktoken").write_text("this is not a rank file\n")


TRAIN = ("train", f"--config={MICRO}:adamw", "--workdir=run")

CASES = {
    "missing config file": (("train", "--config=no_such_config.py", "--workdir=run"),
                            ("no config file 'no_such_config.py'", "tiny")),
    "bad config argument": (("train", "--config=tiny:softmax3,adamw", "--workdir=run"),
                            ("softmax='softmax3' is not allowed", "softmax1")),
    "unknown config field": ((*TRAIN, "--config.optimzer.learning_rate=1e-3"),
                             ("unknown config field config.optimzer", "did you mean "
                              "config.optimizer?")),
    "value of the wrong type": ((*TRAIN, "--config.num_train_steps=ten"),
                                ("--config.num_train_steps=ten",)),
    "value out of range": ((*TRAIN, "--config.num_train_steps=-1"),
                           ("config.num_train_steps=-1 must be a positive integer",)),
    "value not allowed": ((*TRAIN, "--config.optimizer.name=adam"),
                          ("config.optimizer.name='adam' is not allowed", "'adamw'")),
    "missing file": ((*TRAIN, "--config.data.source=text", "--config.data.paths=book.txt"),
                     ("'book.txt' matches no file",)),
    "bad glob": ((*TRAIN, "--config.data.source=text", "--config.data.paths=books/*.txt"),
                 ("'books/*.txt' matches no file",)),
    "non-UTF-8 file": ((*TRAIN, "--config.data.source=text", "--config.data.paths=latin1.txt"),
                       ("latin1.txt", "byte offset 3", "iconv")),
    "bad tokenizer file": ((*TRAIN, "--config.data.source=text", "--config.data.paths=notes.txt",
                            "--config.data.tokenizer_path=garbage.tiktoken"),
                           ("garbage.tiktoken:1: expected 'base64token rank'",)),
    "not a run directory": (("eval", "--workdir=notes.txt"), ("is not a run directory",)),
    "no workdir": (("eval",), ("needs --workdir=DIR",)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_user_error_is_one_message_without_traceback(case: str, tmp_path: pathlib.Path):
  _write_files(tmp_path)
  args, phrases = CASES[case]
  _assert_user_error(_softmax_one(*args, cwd=tmp_path), args[0], *phrases)


def test_a_workdir_of_a_different_run_is_refused(tmp_path: pathlib.Path):
  rundir.write_config(tmp_path / "run", micro_config(optimizer="orthoadam"))
  done = _softmax_one(*TRAIN, cwd=tmp_path)
  _assert_user_error(done, "train", "holds a run with a different model or optimizer",
                     "optimizer.name: 'orthoadam' -> 'adamw'", "use a new --workdir")


@pytest.mark.slow
def test_one_text_file_trains_with_the_readme_example(tmp_path: pathlib.Path):
  """The README's one-file example (on the micro model): a book split at its blank lines."""
  with gzip.open(corpus.default_corpus_path(), "rt", encoding="utf-8") as f:
    (tmp_path / "book.txt").write_text(f.read()[:400_000], encoding="utf-8")
  done = _softmax_one(*TRAIN, "--config.data.source=text", "--config.data.paths=book.txt",
                      "--config.num_train_steps=4", cwd=tmp_path)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "| micro |" in done.stdout      # the results table, with validation perplexity


def test_internal_errors_keep_their_traceback():
  def bug() -> int:
    raise RuntimeError("a bug of ours")
  with pytest.raises(RuntimeError, match="a bug of ours"):
    cli._report_user_errors("train", bug)


def test_user_errors_exit_2_with_the_message(capsys):
  def mistake() -> int:
    raise ConfigError("config.seq_len=0 must be a positive integer.")
  with pytest.raises(SystemExit) as e:
    cli._report_user_errors("train", mistake)
  assert e.value.code == 2
  assert capsys.readouterr().err == (
      "softmax-one train: error: config.seq_len=0 must be a positive integer.\n")


def test_a_full_disk_is_found_behind_wrappers():
  full = OSError(errno.ENOSPC, "No space left on device", "/ckpt/4/state")
  try:
    try:
      raise full
    except OSError as inner:
      raise RuntimeError("Save Finalize thread failed") from inner
  except RuntimeError as wrapped:
    assert disk_full_cause(wrapped) is full
  group = ExceptionGroup("background save", [ValueError("x"), full])
  assert disk_full_cause(group) is full
  as_text = RuntimeError("tensorstore: Error writing local file: No space left on device")
  assert disk_full_cause(as_text).errno == errno.ENOSPC
  assert disk_full_cause(OSError(errno.EDQUOT, "Disk quota exceeded")).errno == errno.EDQUOT
  assert disk_full_cause(OSError(errno.EACCES, "Permission denied")) is None
  assert disk_full_cause(RuntimeError("unrelated")) is None
