"""What every stage shares: the job spec (``config``, ``loading``), the stage contract
(``stage``) and its typed results (``results``), storage, ids, text, user tables, cards,
embeddings, plots, progress and the Ray runtime."""
