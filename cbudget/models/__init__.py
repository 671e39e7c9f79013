"""Neural network models (classifiers and budget networks) for cbudget."""
