"""Tables, figures and the `softmax-one analyze` / `compare` commands end to end."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from softmax_one_jax.analysis import analyze, cli, compare, outliers, report, seeds

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REPO = pathlib.Path(__file__).resolve().parents[2]


def _assert_png(path):
  data = pathlib.Path(path).read_bytes()
  assert data[:8] == PNG_MAGIC and len(data) > 2000, path


def _table_rows(md: str, header_start: str) -> list[list[str]]:
  lines = md.splitlines()
  i = next(j for j, line in enumerate(lines) if line.startswith(header_start))
  rows = []
  for line in lines[i:]:
    if not line.startswith("|"):
      break
    rows.append([c.strip() for c in line.replace("\\|", "¦").strip("|").split("|")])
  assert len({len(r) for r in rows}) == 1, "every table row has the header's column count"
  return rows


def test_metrics_table_values_and_shape():
  runs = {"softmax + adamw": {"perplexity": 21.456, "first_token_attention": 0.65,
                              "first_token_prob": 0.5, "kurtosis_first": 1657.0,
                              "kurtosis_rest": 20.0, "max_abs_first": 3000.0, "max_abs_rest": 10.0,
                              "ppl_w8a8_tensor": 30.0, "penalty_w8a8_tensor": 8.544,
                              "ppl_w4_channel": 3586.0, "penalty_w4_channel": 3565.0},
          "softmax1 + orthoadam": {"perplexity": 20.0, "first_token_attention": 0.033}}
  rows = _table_rows(report.format_metrics_table(runs), "| Model")
  assert len(rows) == 2 + 2
  first = dict(zip(rows[0], rows[2]))
  assert first["PPL"] == "21.46" and first["1st-token %"] == "65.0"
  assert first["Kurt. first"] == "1657.00"
  assert first["int8 PPL (W8A8 tensor/seq)"] == "30.00 (+8.54)"
  assert first["int4 PPL (W4 channel)"] == "3586.00 (+3565.00)"
  second = dict(zip(rows[0], rows[3]))
  assert second["1st-token %"] == "3.3" and second["Kurt. rest"] == "–"


def test_quant_table_lists_every_scheme_found():
  runs = {"a": {"perplexity": 3.0, "ppl_w8_tensor": 3.1, "penalty_w8_tensor": 0.1},
          "b": {"perplexity": 4.0, "ppl_w4_g128": 4.5, "penalty_w4_g128": 0.5}}
  rows = _table_rows(report.format_quant_table(runs), "| Model")
  assert rows[0] == ["Model", "FP PPL", "W8 tensor", "W4 g128"]
  assert rows[2] == ["a", "3.00", "3.10 (+0.10)", "–"]
  assert rows[3] == ["b", "4.00", "–", "4.50 (+0.50)"]


def test_parse_and_default_heads():
  assert cli.parse_heads("0:1,2:3") == [(0, 1), (2, 3)]
  assert cli.parse_heads(None) is None
  with pytest.raises(ValueError, match="layer:head"):
    cli.parse_heads("0-1")
  share = np.array([[0.1, 0.9, 0.2], [0.5, 0.1, 0.0], [0.0, 0.0, 0.7], [0.3, 0.2, 0.1],
                    [0.0, 1.0, 0.0]])
  assert analyze.default_heads(share, max_maps=3) == [(0, 1), (2, 2), (4, 1)]


def _fake_analysis(root: pathlib.Path, name: str, softmax: str, optimizer: str, seed: int,
                   config: dict | None = None):
  rng = np.random.default_rng(seed)
  l, n, d = 3, 2, 16
  sums = {"ft_hits": rng.integers(0, 5, (l, n)).astype(float), "ft_mass": rng.random((l, n)),
          "ft_count": np.full((l, n), 5.0), "kurt_first": rng.random(l) * 100,
          "kurt_rest": rng.random(l) * 10, "n_first": 2.0, "n_rest": 8.0,
          "max_first": rng.random(l) * 50, "max_rest": rng.random(l),
          "max_chan_first": rng.random((l, d)) * 50, "max_chan_rest": rng.random((l, d)),
          "nll": 20.0, "nll_weight": 10.0}
  rep = outliers.finalize(sums)
  maps = [("layer 0 head 0", np.tril(np.ones((6, 6))) / np.arange(1, 7)[:, None])]
  paths = analyze.write_outputs(root / "analysis", name, rep.scalars, rep, maps,
                                {"softmax": softmax, "optimizer": optimizer,
                                 **({} if config is None else {"config": config})})
  return rep, paths


def test_grid_order_rows_softmax_softmax1_learned_sink():
  groups = [seeds.SeedGroup(f"{soft} + {opt}", [{"meta": {"softmax": soft, "optimizer": opt}}],
                            ["run"])
            for soft in ("learned_sink", "other", "softmax1", "softmax")
            for opt in ("orthoadam", "adamw")]
  assert [g.label for g in compare._grid_order(groups)] == [  # pylint: disable=protected-access
      "softmax + adamw", "softmax + orthoadam", "softmax1 + adamw", "softmax1 + orthoadam",
      "learned_sink + adamw", "learned_sink + orthoadam", "other + adamw", "other + orthoadam"]


def test_write_outputs_and_compare_grid(tmp_path):
  grid = [("softmax1", "orthoadam"), ("softmax", "orthoadam"), ("softmax1", "adamw"),
          ("softmax", "adamw")]
  runs = []
  for i, (soft, opt) in enumerate(grid):
    rep, paths = _fake_analysis(tmp_path / f"run{i}", f"{soft} + {opt}", soft, opt, i)
    for key in ("attention_maps", "first_token", "kurtosis", "max_abs", "channels"):
      _assert_png(paths[key])
    saved = json.loads(paths["metrics"].read_text())
    assert saved["metrics"]["perplexity"] == pytest.approx(np.exp(2.0))
    np.testing.assert_allclose(saved["report"]["per_layer"]["kurtosis_first"],
                               rep.per_layer["kurtosis_first"])
    runs.append(str(tmp_path / f"run{i}"))
  result = cli.compare_main(runs, out=str(tmp_path / "cmp"), analyze_missing=False)
  # The paper's 2x2 grid order: softmax before softmax-1, AdamW before OrthoAdam.
  assert list(result["metrics"]) == ["softmax + adamw", "softmax + orthoadam",
                                     "softmax1 + adamw", "softmax1 + orthoadam"]
  md = result["paths"]["table"].read_text()
  assert len(_table_rows(md, "| Model | n | PPL")) == 2 + 4
  for key in ("first_token", "kurtosis", "max_abs", "channels"):
    _assert_png(result["paths"][key])
  with pytest.raises(FileNotFoundError, match="softmax-one analyze"):
    cli.compare_main([str(tmp_path / "nothing")], out=str(tmp_path / "x"), analyze_missing=False)


def test_compare_groups_runs_that_differ_only_in_seed(tmp_path):
  base = {"seed": 0, "optimizer.seed": 0, "optimizer.name": "adamw", "model.softmax": "softmax",
          "model.norm": "layernorm", "name": "tiny", "progress_bar": True}
  configs = [dict(base, seed=s, **{"optimizer.seed": s}) for s in (0, 1, 2)]
  configs.append(dict(base, **{"model.norm": "scalar_layernorm"}))  # one factor changed
  configs.append(dict(base, seed=3, progress_bar=False))  # bookkeeping only: same group
  runs, ppl = [], []
  for i, config in enumerate(configs):
    rep, _ = _fake_analysis(tmp_path / f"run{i}", "softmax + adamw", "softmax", "adamw", i,
                            config=config)
    runs.append(str(tmp_path / f"run{i}"))
    ppl.append(rep.scalars["perplexity"])
  result = cli.compare_main(runs, out=str(tmp_path / "cmp"), analyze_missing=False)
  groups = result["groups"]
  assert sorted(groups) == ["softmax + adamw (model.norm=layernorm)",
                            "softmax + adamw (model.norm=scalar_layernorm)"]
  seeded = groups["softmax + adamw (model.norm=layernorm)"]
  assert seeded["n"] == 4 and seeded["runs"] == [runs[0], runs[1], runs[2], runs[4]]
  expected = np.array([ppl[0], ppl[1], ppl[2], ppl[4]], np.float64)
  assert seeded["mean"]["perplexity"] == pytest.approx(expected.mean(), rel=1e-12)
  assert seeded["std"]["perplexity"] == pytest.approx(expected.std(ddof=1), rel=1e-12)
  assert groups["softmax + adamw (model.norm=scalar_layernorm)"]["n"] == 1
  rows = _table_rows(result["paths"]["table"].read_text(), "| Model | n | PPL")
  row = dict(zip(rows[0], rows[2]))
  assert row["n"] == "4"
  assert row["PPL"] == f"{expected.mean():.2f} ± {expected.std(ddof=1):.2f}"
  single = dict(zip(rows[0], rows[3]))
  assert single["n"] == "1" and "±" not in single["PPL"]
  saved = json.loads(result["paths"]["table"].with_name("metrics.json").read_text())
  assert saved["groups"]["softmax + adamw (model.norm=layernorm)"]["values"]["perplexity"] == (
      pytest.approx(list(expected)))


def test_first_token_chance_against_a_python_count():
  from softmax_one_jax.analysis import layout  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(7)
  seg = np.sort(rng.integers(0, 4, (3, 40)), axis=1)  # packed documents, padding (0) first
  total, count = 0.0, 0
  for row in seg:
    for t in range(len(row)):
      start = t
      while start > 0 and row[start - 1] == row[t]:
        start -= 1
      if row[t] != 0 and start != t:  # real queries that do not start a document
        total, count = total + 1.0 / (t - start + 1), count + 1
  assert float(layout.first_token_chance(seg, 3, 40)) == pytest.approx(total / count, rel=1e-6)
  harmonic = sum(1.0 / k for k in range(1, 129))
  assert float(layout.first_token_chance(None, 2, 128)) == pytest.approx((harmonic - 1) / 127,
                                                                        rel=1e-6)


def test_analyze_hf_checkpoint_end_to_end(tmp_path):
  torch = pytest.importorskip(
      "torch", reason="the HF analysis test needs torch: pip install torch==2.13.0 '.[hf]'")
  transformers = pytest.importorskip(
      "transformers", reason="the HF analysis test needs transformers: pip install '.[hf]'")
  torch.manual_seed(0)
  config = transformers.GPT2Config(n_positions=64, n_embd=32, n_layer=2, n_head=4)  # GPT-2 vocab
  transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2", safe_serialization=True)
  result = cli.analyze_main(hf=str(tmp_path / "gpt2"), out=str(tmp_path / "out"), num_batches=2,
                            batch_size=2, seq_len=32, schemes="w8a8_token,w4_g128")
  m = result["metrics"]
  # An untrained model over the GPT-2 vocabulary: perplexity near the vocabulary size.
  assert 0.5 * 50257 < m["perplexity"] < 2 * 50257
  for s in ("w8a8_token", "w4_g128"):
    assert m[f"penalty_{s}"] == pytest.approx(m[f"ppl_{s}"] - m["perplexity"])
  assert result["meta"]["softmax"] == "softmax" and result["meta"]["tokens"] == 2 * 2 * 32
  rows = _table_rows(result["paths"]["table"].read_text(), "| Model | n | PPL")
  assert rows[2][0] == "gpt2"
  for name in cli.FIGURES:
    _assert_png(tmp_path / "out" / name)


@pytest.mark.slow
def test_analyze_tiny_run_through_the_cli(tmp_path):
  from softmax_one_jax.training import loop
  from tests.training._micro import micro_config

  config = micro_config(num_train_steps=2)
  config.checkpoint.every_steps = 2
  loop.train(config, str(tmp_path / "run"))
  out = tmp_path / "run" / "analysis"
  env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.run(
      [sys.executable, "-m", "softmax_one_jax.cli", "analyze", f"--workdir={tmp_path / 'run'}",
       "--num_batches=2", "--batch_size=2", "--schemes=w8a8_tensor,w4_channel", "--heads=0:1"],
      capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  md = (out / "table.md").read_text()
  rows = _table_rows(md, "| Model | n | PPL")
  row = dict(zip(rows[0], rows[2]))
  assert row["Model"] == "softmax1 + orthoadam"
  assert "(" in row["int8 PPL (W8A8 tensor/seq)"] and "(" in row["int4 PPL (W4 channel)"]
  assert "Round-to-nearest quantisation" in md
  for name in cli.FIGURES:
    _assert_png(out / name)
  saved = json.loads((out / "metrics.json").read_text())
  assert 0.0 <= saved["metrics"]["first_token_attention"] <= 1.0
  assert np.asarray(saved["report"]["per_channel"]["max_abs_rest"]).shape == (1, 32)
  # compare: the run next to itself under two names.
  result = cli.compare_main([str(tmp_path / "run"), str(out)], out=str(tmp_path / "cmp"),
                            names=["a", "b"])
  assert list(result["metrics"]) == ["a", "b"]


def test_tables_name_each_runs_rotation_and_its_mixing_width():
  from softmax_one_jax.analysis.report import format_analysis_markdown, training_note
  ortho = {"optimizer.name": "orthoadam", "optimizer.rotation": None, "model.norm": "scalar_rmsnorm"}
  adamw = {"optimizer.name": "adamw", "optimizer.rotation": None, "model.norm": "rmsnorm"}
  assert training_note(ortho) == ("orthoadam, rotation hadamard (every axis mixed whole "
                                  "(block-diagonal only on an axis whose odd part exceeds 1024)), "
                                  "norm scalar_rmsnorm")
  assert training_note(adamw) == "adamw, norm rmsnorm"
  assert "block" in training_note({"optimizer.name": "orthoadam", "optimizer.rotation": "block"})
  text = format_analysis_markdown({"a": {"perplexity": 3.0}, "b": {"perplexity": 4.0}},
                                  trained={"a": training_note(ortho), "b": training_note(adamw)})
  assert "- a: orthoadam, rotation hadamard (every axis mixed whole" in text
  assert "- b: adamw, norm rmsnorm" in text
