"""Pure values and rules: architectures, configurations, strategies, errors, labels."""
