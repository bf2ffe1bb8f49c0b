"""The paper's numbers that a study's report is put beside (Gloeckle et al. 2024).

Transcribed from ../shared/reference/paper-facts.md §3–§4: Table 1 (7B models trained on
code; pass@k in %, 200 samples per problem, the oracle temperature per model, dataset and
k) and Table S3 (self-speculative decoding of the 7B byte models: 4096 prompts of 1024
bytes, 1024-byte completions, batch 16).
"""

from __future__ import annotations

TASKS = ("mbpp", "humaneval", "apps")  # Table 1's column groups, in its order
TASK_TITLES = {"mbpp": "MBPP", "humaneval": "HumanEval", "apps": "APPS-Intro"}
KS = (1, 10, 100)

# (data, vocab, n) -> {task: (pass@1, pass@10, pass@100)}; vocab as in data.tokenizer
TABLE1: dict[tuple[str, str, int], dict[str, tuple[float, float, float]]] = {
    ("313B bytes (0.5 ep)", "bytes", 1): {"mbpp": (19.3, 42.4, 64.7), "humaneval": (18.1, 28.2, 47.8), "apps": (0.1, 0.5, 2.4)},
    ("313B bytes (0.5 ep)", "bytes", 8): {"mbpp": (32.3, 50.0, 69.6), "humaneval": (21.8, 34.1, 57.9), "apps": (1.2, 5.7, 14.0)},
    ("313B bytes (0.5 ep)", "bytes", 16): {"mbpp": (28.6, 47.1, 68.0), "humaneval": (20.4, 32.7, 54.3), "apps": (1.0, 5.0, 12.9)},
    ("313B bytes (0.5 ep)", "bytes", 32): {"mbpp": (23.0, 40.7, 60.3), "humaneval": (17.2, 30.2, 49.7), "apps": (0.6, 2.8, 8.8)},
    ("200B tok (0.8 ep)", "bpe", 1): {"mbpp": (30.0, 53.8, 73.7), "humaneval": (22.8, 36.4, 62.0), "apps": (2.8, 7.8, 17.4)},
    ("200B tok (0.8 ep)", "bpe", 2): {"mbpp": (30.3, 55.1, 76.2), "humaneval": (22.2, 38.5, 62.6), "apps": (2.1, 9.0, 21.7)},
    ("200B tok (0.8 ep)", "bpe", 4): {"mbpp": (33.8, 55.9, 76.9), "humaneval": (24.0, 40.1, 66.1), "apps": (1.6, 7.1, 19.9)},
    ("200B tok (0.8 ep)", "bpe", 6): {"mbpp": (31.9, 53.9, 73.1), "humaneval": (20.6, 38.4, 63.9), "apps": (3.5, 10.8, 22.7)},
    ("200B tok (0.8 ep)", "bpe", 8): {"mbpp": (30.7, 52.2, 73.4), "humaneval": (20.0, 36.6, 59.6), "apps": (3.5, 10.4, 22.1)},
    ("1T tok (4 ep)", "bpe", 1): {"mbpp": (40.7, 65.4, 83.4), "humaneval": (31.7, 57.6, 83.0), "apps": (5.4, 17.8, 34.1)},
    ("1T tok (4 ep)", "bpe", 4): {"mbpp": (43.1, 65.9, 83.7), "humaneval": (31.6, 57.3, 86.2), "apps": (4.3, 15.6, 33.7)},
}
TABLE1_CAPTION = (
    "Paper Table 1: 7B models trained on code, pass@k (%) from 200 samples per problem with "
    "the best temperature per model, dataset and k (Gloeckle et al. 2024)."
)

# model n -> {heads used: (speedup, bytes per forward)}
TABLE_S3: dict[int, dict[int, tuple[float, float]]] = {
    8: {2: (1.94, 1.98), 4: (3.67, 3.84), 8: (6.39, 7.04)},
    16: {2: (1.94, 1.98), 4: (3.63, 3.81), 8: (6.25, 6.92), 12: (8.07, 9.36), 16: (9.24, 11.20)},
    32: {2: (1.93, 1.97), 4: (3.62, 3.80), 8: (6.22, 6.89), 12: (8.01, 9.30), 16: (9.15, 11.15),
         20: (9.83, 12.61), 24: (10.34, 13.67), 28: (10.55, 14.58), 32: (10.84, 15.35)},
}
TABLE_S3_CAPTION = (
    "Paper Table S3: self-speculative decoding of the 7B byte models on code (4096 prompts of "
    "1024 bytes, 1024-byte completions, batch 16): speedup / bytes per forward by heads used."
)


def table1_rows(vocab: str) -> dict[tuple[str, int], dict[str, tuple[float, float, float]]]:
    """The paper's Table 1 rows for one vocabulary (bytes or bpe): (data, n) -> values."""
    return {(data, n): v for (data, voc, n), v in TABLE1.items() if voc == vocab}
