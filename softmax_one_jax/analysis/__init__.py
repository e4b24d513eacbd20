"""The paper's measurements: first-token attention, kurtosis, max |activation|, RTN quantisation.

Example:
  >>> from softmax_one_jax.analysis import outlier_metrics, SCHEMES, quantize_model
  >>> m = outlier_metrics(model, tokens_bt)                        # doctest: +SKIP
  >>> qmodel = quantize_model(model, SCHEMES["w4_g128"])            # doctest: +SKIP
"""

from softmax_one_jax.analysis.outliers import (
    OutlierReport,
    evaluate_sums,
    finalize,
    outlier_metrics,
    stack_batches,
)
from softmax_one_jax.analysis.quantize import SCHEMES, QuantScheme, quantize_model, quantize_params
from softmax_one_jax.analysis.report import (format_metrics_table, format_quant_table,
                                             print_metrics_table)

__all__ = [
    "OutlierReport",
    "QuantScheme",
    "SCHEMES",
    "evaluate_sums",
    "finalize",
    "format_metrics_table",
    "format_quant_table",
    "outlier_metrics",
    "print_metrics_table",
    "quantize_model",
    "quantize_params",
    "stack_batches",
]
