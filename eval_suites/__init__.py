"""Evaluation suites: generate to a GenEval-layout folder, then score the folder (DESIGN.md §7).

Runnable: `python -m eval_suites.geneval`, `python -m eval_suites.mjhq_fid`, `python -m eval_suites.clip_score`
(each with `generate` and `score` commands). Scoring never imports model code; all weights are local files.
"""
