"""Versioned JSON schema of the harness outputs (``qflash bench`` / ``qflash accuracy``).

Bump ``SCHEMA_VERSION`` when a key is removed or changes meaning; adding keys is compatible.
The key tuples below are the documented contract: tests assert them, ``qflash report`` reads them.

Bench document (``bench.json``)::

    {
      "schema_version": 1,
      "kind": "bench",
      "command": "qflash bench --quick ...",      # the command line that made the numbers
      "env": ENV_KEYS,                            # see env.collect_env
      "settings": BENCH_SETTINGS_KEYS,
      "shapes": [BENCH_SHAPE_KEYS, ...],
      "rows": [BENCH_ROW_KEYS, ...]               # one per (shape, implementation)
    }

Row fields: ``median_ms``/``mean_ms`` (float, ms; null unless status "ok"), ``tops``
(4·B·H·Sq·Sk·D / time, halved for causal, in tera-ops/s), ``speedup_vs_sdpa`` (SDPA default's
median / this row's median, same run; null when SDPA default did not run), ``peak_mem_mib``
(CUDA peak allocation of one call above what was allocated before it, MiB; null on CPU),
``rel_l2`` / ``cosine`` / ``max_abs`` (vs the shape's exact reference), ``status`` ("ok",
"skipped" or "error") and ``note`` (why, for skipped/error rows; "" otherwise).

Accuracy document (``accuracy.json``)::

    {
      "schema_version": 1, "kind": "accuracy", "command": ..., "env": ..., "settings": ...,
      "workloads": [ACC_WORKLOAD_KEYS, ...],
      "rows": [ACC_ROW_KEYS, ...],                # one per (workload, preset)
      "model": ACC_MODEL_KEYS,                    # MiniLM end-to-end (status "skipped" if absent)
      "quantizer": [QUANTIZER_ROW_KEYS, ...]      # round-trip RMSE table
    }
"""

from __future__ import annotations

SCHEMA_VERSION = 1

TOP_KEYS = ("schema_version", "kind", "command", "env", "settings")

ENV_KEYS = (
    "date", "hostname", "platform", "python", "torch", "triton", "cuda", "device", "gpu_name",
    "gpu_count", "cpu_threads", "git_revision", "git_dirty", "qflash", "sageattention",
)

BENCH_KEYS = TOP_KEYS + ("shapes", "rows")
BENCH_SETTINGS_KEYS = (
    "device", "dtype", "quick", "warmup_ms", "rep_ms", "seed", "timer", "cpu_reference_run", "presets",
)
BENCH_SHAPE_KEYS = (
    "name", "batch", "heads", "seq_q", "seq_k", "head_dim", "causal", "ops", "reference",
)
BENCH_ROW_KEYS = (
    "shape", "impl", "kind", "preset", "backend", "status", "note", "median_ms", "mean_ms", "tops",
    "speedup_vs_sdpa", "peak_mem_mib", "rel_l2", "cosine", "max_abs",
)

ACC_KEYS = TOP_KEYS + ("workloads", "rows", "model", "quantizer")
ACC_SETTINGS_KEYS = ("device", "dtype", "quick", "seed", "presets", "reference", "weights_check")
ACC_WORKLOAD_KEYS = ("name", "description", "batch", "heads", "seq_q", "seq_k", "head_dim", "causal")
ACC_ROW_KEYS = (
    "workload", "preset", "status", "note", "rel_l2", "rel_l1", "cosine", "max_abs", "nonfinite",
    "weights_in_unit_interval", "p_min", "p_max", "row_sum_max_err",
)
ACC_MODEL_KEYS = ("name", "status", "note", "sentences", "rows")
ACC_MODEL_ROW_KEYS = ("preset", "status", "note", "attention_calls", "embedding_cosine_mean", "embedding_cosine_min")
QUANTIZER_ROW_KEYS = ("input", "precision", "granularity", "strategy", "rmse", "rel_rmse")
