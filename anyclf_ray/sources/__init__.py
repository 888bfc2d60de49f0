"""Sources: the stages that write a run's rows (generation), their plan and committed parts."""
