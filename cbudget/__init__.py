"""cbudget: bound propagation and certified training with learned per-dimension perturbation budgets."""
