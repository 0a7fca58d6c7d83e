"""The language model side: training data, the model and its heads, training, checkpoints, distribution,
generation and evaluation."""
