"""Training: the SetFit classifier on Ray Train, its evaluation, and batch prediction."""
