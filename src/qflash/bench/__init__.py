"""The benchmark and accuracy harness behind the ``qflash`` command line.

Modules (each small, each usable on its own):

- ``schema``    JSON schema version and the documented keys of every output record.
- ``env``       the environment record: GPU, versions, git revision, date.
- ``shapes``    attention shapes, their ``BxHxSxD[c]`` spelling, and the default shape sets.
- ``metrics``   error metrics and the exact reference used to measure them.
- ``timing``    GPU timing (``triton.testing.do_bench``) and a CPU wall-clock fallback.
- ``progress``  a progress bar (tqdm if installed, else a stderr counter).
- ``impls``     the rows of a benchmark: qflash presets and full-precision baselines.
- ``bench``     ``qflash bench``: run shapes x rows, collect a results dict.
- ``accuracy``  ``qflash accuracy``: error of each preset on named workloads.
- ``minilm``    real attention inputs from a MiniLM sentence encoder, and its embeddings.
- ``patch``     a reversible context manager routing SDPA calls to ``qflash.attention``.
- ``writers``   JSON / CSV / Markdown outputs.
- ``plot``      the PNG plot (matplotlib, or a built-in bar-chart fallback).
- ``report``    ``qflash report``: a Markdown performance snapshot from harness JSON.
- ``tune``      ``qflash tune``: kernel-config sweep (plumbing only until the kernels land).
"""
