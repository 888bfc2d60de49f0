"""The LLM side: the engine seam (``engine``), the run's replicated engines (``pool``), the
prompts and their answer schemas (``prompts``), valid items (``items``), calibrated judgements
(``judgement``) and context budgets."""
