"""Sources: the stages that write a run's rows (generation; annotation of the user's own texts),
their plan and committed parts."""
