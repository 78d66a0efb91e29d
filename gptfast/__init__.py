"""gptfast: a lean GPT-2-class trainer for one consumer GPU."""

__version__ = "0.1.0"
