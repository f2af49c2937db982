"""Mutation check: can the CI tests see a 1 % error? (issue 14, "Done when")

For each preset and each path a call can take, scale that path's attention output by 1.01 (a
monkeypatch installed by a pytest plugin this script writes) and run the CI tests of that path;
the mutation is *caught* when at least one test fails. Paths:

- ``reference``: the reference family's forward (what ``qflash.attention`` runs on the CPU);
- ``portable``: the portable Triton family's forward (the CPU interpreter here);
- ``sdpa``: the drop-in, ``qflash.sdpa`` (and the patched SDPA) for that preset;
- ``ops``: ``qflash.ops.run``, the one host entry below the public API (eager and custom op).

    python benchmarks/mutation_check.py                  # every preset x path (~3 min on 2 cores)
    python benchmarks/mutation_check.py --paths sdpa --presets int8

Prints one line per mutation (caught by which test, or SURVIVED) and exits 1 if any survived.
Results are recorded in docs/perf/NOTES.md ("Mutation check").
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESETS = ("none", "int8", "int8-fp8", "int4", "fp8")
FACTOR = 1.01

# the CI tests of each path, cheapest catchers first (pytest runs with -x: the first failure ends a run)
SUBSETS = {
    "reference": ["tests/test_reference.py", "tests/test_attention_api.py", "tests/test_sdpa.py"],
    "portable": ["tests/test_attention_api.py", "tests/test_sdpa.py::test_kernel_semantics", "tests/test_kernels.py"],
    "sdpa": ["tests/test_sdpa.py"],
    "ops": ["tests/test_ops.py", "tests/test_attention_api.py"],
}

PLUGIN = r'''
"""pytest plugin written by benchmarks/mutation_check.py: scale one path's output by FACTOR."""
import os

PATH, PRESET, FACTOR = os.environ["QFLASH_MUTATE_PATH"], os.environ["QFLASH_MUTATE_PRESET"], float(os.environ["QFLASH_MUTATE_FACTOR"])
FIRED = [0]


def _name(quant):
    from qflash.config import resolve_quant
    return resolve_quant(quant).name


def _scaled(res):
    FIRED[0] += 1
    if isinstance(res, tuple):
        return (res[0] * FACTOR, *res[1:])
    return res * FACTOR


def pytest_configure(config):
    import qflash.dropin
    import qflash.ops
    from qflash.kernels import dispatch

    if PATH in ("reference", "portable"):
        fam = dispatch.FAMILIES[PATH]
        original = type(fam).forward

        def forward(self, spec, q, k, v, attn_mask):
            res = original(self, spec, q, k, v, attn_mask)
            return _scaled(res) if spec.quant.name == PRESET else res

        type(fam).forward = forward
    elif PATH == "sdpa":
        original = qflash.dropin._sdpa

        def _sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, quant, *rest):
            out, ran = original(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, quant, *rest)
            return (_scaled(out), ran) if ran and _name(quant) == PRESET else (out, ran)

        qflash.dropin._sdpa = _sdpa
    elif PATH == "ops":
        original = qflash.ops.run

        def run(spec, q, k, v, attn_mask=None):
            res = original(spec, q, k, v, attn_mask)
            return _scaled(res) if spec.quant.name == PRESET else res

        qflash.ops.run = run
        qflash.dropin.run = run  # the drop-in imported it by name
    else:
        raise ValueError(PATH)


def pytest_unconfigure(config):
    with open(os.environ["QFLASH_MUTATE_REPORT"], "w") as f:
        f.write(str(FIRED[0]))
'''


def run_one(path: str, preset: str, tmp: str, timeout: int) -> dict:
    report = os.path.join(tmp, f"fired-{path}-{preset}")
    env = dict(os.environ, QFLASH_MUTATE_PATH=path, QFLASH_MUTATE_PRESET=preset, QFLASH_MUTATE_FACTOR=str(FACTOR),
               QFLASH_MUTATE_REPORT=report, PYTHONPATH=tmp + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-p", "qflash_mutation_plugin",
           *SUBSETS[path]]
    t0 = time.time()
    try:
        res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        rc, out = res.returncode, res.stdout + res.stderr
    except subprocess.TimeoutExpired as exc:
        rc, out = -1, (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
    fired = int(open(report).read()) if os.path.exists(report) else 0
    failed = re.findall(r"^FAILED (\S+)", out, re.M)
    return {"path": path, "preset": preset, "rc": rc, "fired": fired, "caught_by": failed[0] if failed else None,
            "seconds": round(time.time() - t0, 1), "tail": out[-600:]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", nargs="+", default=list(PRESETS))
    ap.add_argument("--paths", nargs="+", default=list(SUBSETS))
    ap.add_argument("--timeout", type=int, default=1200, help="seconds per pytest run")
    args = ap.parse_args(argv)
    survived = 0
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "qflash_mutation_plugin.py"), "w") as f:
            f.write(PLUGIN)
        for path in args.paths:
            for preset in args.presets:
                r = run_one(path, preset, tmp, args.timeout)
                if r["rc"] == 1 and r["caught_by"]:
                    verdict = f"caught by {r['caught_by']}"
                else:
                    survived += 1
                    why = "the mutation never ran" if not r["fired"] else f"pytest rc {r['rc']}"
                    verdict = f"SURVIVED ({why})\n{r['tail']}"
                print(f"{path:9s} {preset:8s} x{FACTOR}: {verdict}  [{r['seconds']} s, {r['fired']} mutated calls]",
                      flush=True)
    print(f"{survived} mutation(s) survived" if survived else "every mutation was caught")
    return 1 if survived else 0


if __name__ == "__main__":
    raise SystemExit(main())
