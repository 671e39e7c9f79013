"""Launch scripts (training, evaluation, visualisation) for cbudget."""
