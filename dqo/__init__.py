"""dqo: a slim DeepSpeed trainer for Direct Q-function Optimization on top of dqo_kernels."""
