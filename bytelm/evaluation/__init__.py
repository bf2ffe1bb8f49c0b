"""Code-generation evaluation: HumanEval, MBPP and APPS, run in a sandbox, scored by pass@k.

- `tasks`: the benchmarks as problems (prompts, stop sequences, programs, judging).
- `sandbox`: `Executor`, which runs untrusted programs in isolated subprocesses.
- `passk`: the unbiased pass@k estimator and the oracle-temperature view.
- `runner`: samples, reference and checkpoint evaluations; `cli`: `bytelm eval`.

docs/evaluation.md documents the formats, the sandbox's guarantees and its throughput.
"""
