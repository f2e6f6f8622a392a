"""The soak test: the sandbox under bounded continuous churn for a long time (`soak` marker)."""
