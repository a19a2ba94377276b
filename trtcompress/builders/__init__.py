"""The build pipeline: recipe -> compressed model -> artifact -> evaluation and gates."""
